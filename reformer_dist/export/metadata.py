"""The ``reformer_dist.*`` entries of an exported graph's ``metadata_props`` (no torch needed to read them).

Keys (prefix removed): format_version, version (of reformer-dist), config (JSON of the ReformerConfig),
precision, flavour, lsh_sort, max_seq_len, pad_multiple, vocab_size, tokenizer (JSON spec, file name
only) and tokenizer_file (base64 of a file tokenizer, so the .onnx alone can tokenize).
"""

from __future__ import annotations

import onnx

PREFIX = "reformer_dist."
FORMAT_VERSION = "1"  # bump when the graph's inputs/outputs or these keys change


def set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    """Write ``reformer_dist.*`` entries (replacing existing ones with the same keys)."""
    keep = [p for p in proto.metadata_props if p.key.removeprefix(PREFIX) not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in values.items():
        proto.metadata_props.add(key=PREFIX + key, value=value)


def read_metadata(source: onnx.ModelProto | dict[str, str]) -> dict[str, str]:
    """``reformer_dist.*`` entries (prefix removed) of a ModelProto or an ORT ``custom_metadata_map``."""
    items = source.items() if isinstance(source, dict) else ((p.key, p.value) for p in source.metadata_props)
    return {k.removeprefix(PREFIX): v for k, v in items if k.startswith(PREFIX)}

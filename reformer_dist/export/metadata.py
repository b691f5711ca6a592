"""The ``reformer_dist.*`` entries of an exported graph's ``metadata_props`` (no torch needed to read them).

Keys (prefix removed): format_version, version (of reformer-dist), config (JSON of the ReformerConfig),
precision, flavour, lsh_sort, max_seq_len, pad_multiple, vocab_size, model_name (the run or model
directory it was exported from: the served model id), rotation_seed (of the frozen LSH rotations),
tokenizer (JSON spec, file name only) and tokenizer_file (base64 of a file tokenizer, so the .onnx alone
can tokenize; both written and read by ``reformer_dist.artifacts.tokenizer_spec``); the generation graphs
add graph and cache_names, an int8 graph quantized_from. ``export.onnx_graph.graph_metadata`` fills them.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

PREFIX = "reformer_dist."
FORMAT_VERSION = "1"  # bump when the graph's inputs/outputs or these keys change
GENERATION_GRAPHS = ("prefill", "decode")


def generation_paths(model_path: str | os.PathLike, suffix: str | None = None) -> dict[str, Path]:
    """The cached-generation companions of ``model_path``: ``{"prefill": <stem>.prefill<suffix>,
    "decode": <stem>.decode<suffix>}`` beside it (suffix: the model's own, e.g. .onnx or .plan)."""
    path = Path(model_path)
    suffix = path.suffix if suffix is None else suffix
    return {name: path.with_name(f"{path.stem}.{name}{suffix}") for name in GENERATION_GRAPHS}


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

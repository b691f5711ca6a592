"""How a model records its tokenizer, wherever the model is stored.

The record is a tokenizer spec (``reformer_dist.data.tokenizer``): ``{"kind": "bytes", "offset": 2}``, or
a kind plus the ``path`` of a tokenizer file. Each store keeps it its own way; this module writes and
reads all three:

- native directory: ``tokenizer.json`` holds the spec; a tokenizer file is copied in under a fixed name
  per kind (:data:`NATIVE_FILES`) and the spec's path names it relative to the directory.
- Hugging Face directory: the tokenizer file under HF's own name (:data:`HF_FILES`) and no spec; the kind
  follows from the file name, byte vocabularies need no file.
- exported graph: metadata ``tokenizer`` (the spec as JSON, file name only) and ``tokenizer_file``
  (base64 of the file), so the .onnx alone can tokenize.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from reformer_dist.artifacts.files import inside, read_json_object
from reformer_dist.atomic_write import atomic_write
from reformer_dist.data.tokenizer import Tokenizer, get_tokenizer
from reformer_dist.errors import CheckpointError, ReformerDistError

SPEC_FILE = "tokenizer.json"
# "tokenizer.json" is the spec itself in a native directory, so a tokenizers file takes another name there
NATIVE_FILES = {"sentencepiece": "spiece.model", "hf_tokenizers": "hf_tokenizer.json"}
HF_FILES = {"hf_tokenizers": "tokenizer.json", "sentencepiece": "spiece.model"}  # read in this order


# ------------------------------------------------------------------------------------- native directory
def write_native(spec: dict[str, Any], directory: Path) -> None:
    """Write ``spec`` into the native directory being assembled at ``directory``, copying its file in
    (the directory must stand alone)."""
    spec = dict(spec)
    if "path" in spec:
        name = NATIVE_FILES.get(spec["kind"], Path(spec["path"]).name)
        shutil.copyfile(spec["path"], directory / name)  # the contents, not the source's permission bits
        spec["path"] = name
    (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")


def read_native(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The tokenizer spec of a native directory (file paths made absolute), or None if it has none."""
    file = Path(directory) / SPEC_FILE
    if not file.is_file():
        return None
    spec = read_json_object(file, "a tokenizer spec")
    if not isinstance(spec.get("kind"), str) or not isinstance(spec.get("path", ""), str):
        raise CheckpointError(f"{file}: not a tokenizer spec (expected an object like {{\"kind\": \"bytes\"}})")
    if "path" in spec:
        spec["path"] = str(inside(directory, spec["path"], file))
    return spec


# ------------------------------------------------------------------------------- Hugging Face directory
def write_hf(spec: dict[str, Any], directory: Path) -> None:
    """Copy ``spec``'s tokenizer file (if it names one) into the HF directory ``directory``, atomically."""
    if "path" in spec:
        source = spec["path"]
        atomic_write(directory / HF_FILES[spec["kind"]], lambda tmp: shutil.copyfile(source, tmp))


def read_hf(directory: str | os.PathLike, vocab_size: int) -> dict[str, Any] | None:
    """The tokenizer of an HF model directory: its ``tokenizer.json`` or ``spiece.model`` if present;
    otherwise raw bytes for byte-sized vocabularies (258 = google/reformer-enwik8's ``byte + 2``, 0 = pad;
    256 = plain bytes); None if unknown."""
    for kind, name in HF_FILES.items():
        if (Path(directory) / name).is_file():
            return {"kind": kind, "path": str(Path(directory) / name)}
    if vocab_size in (256, 258):
        return {"kind": "bytes", "offset": vocab_size - 256}
    return None


# ---------------------------------------------------------------------------------------- graph metadata
def tokenizer_metadata(spec: dict[str, Any] | None) -> dict[str, str]:
    """The metadata entries that record ``spec`` in an exported graph (none for no tokenizer)."""
    if spec is None:
        return {}
    meta = {"tokenizer": json.dumps({k: (os.path.basename(v) if k == "path" else v) for k, v in spec.items()})}
    if "path" in spec:  # embed the file so the .onnx alone can tokenize
        meta["tokenizer_file"] = base64.b64encode(Path(spec["path"]).read_bytes()).decode("ascii")
    return meta


def metadata_spec(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The tokenizer spec an exported graph records (its ``path``, if any, is a bare file name), or None."""
    return json.loads(metadata["tokenizer"]) if "tokenizer" in metadata else None


def tokenizer_from_metadata(metadata: dict[str, str]) -> Tokenizer | None:
    """The tokenizer an exported graph records (for a file tokenizer, built from the embedded file);
    None if the export recorded none."""
    spec = metadata_spec(metadata)
    if spec is None:
        return None
    if "path" not in spec:
        return get_tokenizer(spec)
    if "tokenizer_file" not in metadata:
        raise ReformerDistError(f"the model records a {spec.get('kind')} tokenizer but does not embed its file")
    # The tokenizer libraries load from a path: materialise the embedded file just long enough to load it.
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / os.path.basename(spec["path"])
        file.write_bytes(base64.b64decode(metadata["tokenizer_file"]))
        return get_tokenizer({**spec, "path": str(file)})


"""Find and load the model behind a path, whatever kind of model directory the user points at.

``load_model(path)`` accepts

- a training run directory (``RUN_DIR``): its consolidated native model ``RUN_DIR/native``, written when
  training finishes (any ZeRO stage);
- a native directory: ``model.safetensors`` + ``config.yaml`` (+ ``tokenizer.json``, the tokenizer spec);
- a ``.safetensors`` file inside a native directory;
- a Hugging Face Reformer directory (``config.json`` + weights).

Export, convert, generate and serve all load models here, so they resolve paths the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reformer_dist.artifacts import native, tokenizer_spec
from reformer_dist.errors import CheckpointError

if TYPE_CHECKING:
    from reformer_dist.model.reformer import ReformerLM


@dataclass
class ModelSource:
    model: ReformerLM
    """The ReformerLM, fp32, eval mode."""
    tokenizer: dict | None
    """The tokenizer spec (``reformer_dist.data.tokenizer``) the directory records or implies, if any."""
    kind: str
    """'native' or 'hf'."""
    path: Path
    """The directory the weights came from."""


def load_model(path: str | os.PathLike) -> ModelSource:
    """Load the model behind ``path`` (see module doc); CheckpointError names what is missing."""
    # imported here: it imports torch, which the generate and serve commands must configure first
    from reformer_dist.artifacts import hf_checkpoint

    path = Path(path)
    if path.is_file() and path.name == native.WEIGHTS:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory or {native.WEIGHTS} file")
    if native.is_native_dir(path / native.RUN_NATIVE_DIR):
        path = path / native.RUN_NATIVE_DIR
    if native.is_native_dir(path):
        return ModelSource(native.from_native(path), tokenizer_spec.read_native(path), "native", path)
    if hf_checkpoint.is_hf_dir(path):
        model = hf_checkpoint.from_hf(path)
        return ModelSource(model, tokenizer_spec.read_hf(path, model.config.vocab_size), "hf", path)
    if (path / "latest").is_file():
        raise CheckpointError(f"{path}: a training run without a consolidated model ({native.RUN_NATIVE_DIR}/"
                              f"{native.WEIGHTS}); it is written when training finishes")
    raise CheckpointError(f"{path}: not a run directory, a native model directory ({native.WEIGHTS} + "
                          f"{native.CONFIG}) or a Hugging Face Reformer directory (config.json + weights)")


def model_name(path: str | os.PathLike) -> str:
    """The name a model is known by (the served model id, recorded in exports): the name of its run or
    model directory. A file names the directory holding it; a run's ``native/`` names the run."""
    path = Path(path).resolve()
    if path.is_file():
        path = path.parent
    if path.name == native.RUN_NATIVE_DIR:
        path = path.parent
    return path.name

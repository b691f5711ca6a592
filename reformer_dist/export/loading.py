"""Find and load the model to export, whatever kind of checkpoint the user points at.

``load_model_for_export(path)`` accepts

- a training run directory (``RUN_DIR``): its consolidated native checkpoint ``RUN_DIR/native``,
  written when training finishes (any ZeRO stage);
- a native directory: ``model.safetensors`` + ``config.yaml`` (+ ``tokenizer.json``, the tokenizer spec);
- a ``.safetensors`` file inside a native directory;
- a Hugging Face Reformer directory (``config.json`` + weights).

The readers are the model package's (``model.native``, ``model.hf_interop``); this module only decides
which one a path needs, so export, serving and generation resolve paths the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reformer_dist.errors import CheckpointError

if TYPE_CHECKING:
    from torch import nn

RUN_NATIVE_DIR = "native"


@dataclass
class ExportSource:
    model: nn.Module
    """The ReformerLM, fp32, eval mode."""
    tokenizer: dict | None
    """The tokenizer spec (``reformer_dist.data.tokenizer``) the checkpoint records or implies, if any."""
    kind: str
    """'native' or 'hf'."""
    path: Path
    """The directory the weights came from."""


def load_model_for_export(path: str | os.PathLike) -> ExportSource:
    """Load the model behind ``path`` (see module doc); CheckpointError names what is missing."""
    from reformer_dist.model import hf_interop, native

    path = Path(path)
    if path.is_file() and path.name == native.WEIGHTS:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory or {native.WEIGHTS} file")
    if native.is_native_dir(path / RUN_NATIVE_DIR):
        path = path / RUN_NATIVE_DIR
    if native.is_native_dir(path):
        return ExportSource(native.from_native(path), native.native_tokenizer(path), "native", path)
    if hf_interop.is_hf_dir(path):
        model = hf_interop.from_hf(path)
        return ExportSource(model, hf_interop.hf_tokenizer_spec(path, model.config.vocab_size), "hf", path)
    if (path / "latest").is_file():
        raise CheckpointError(f"{path}: a training run without a consolidated model ({RUN_NATIVE_DIR}/"
                              f"{native.WEIGHTS}); it is written when training finishes")
    raise CheckpointError(f"{path}: not a run directory, a native model directory ({native.WEIGHTS} + "
                          f"{native.CONFIG}) or a Hugging Face Reformer directory (config.json + weights)")


def model_name(path: str | os.PathLike) -> str:
    """The name a model is known by (the served model id, recorded in exports): the name of its run or
    model directory. A file names the directory holding it; a run's ``native/`` names the run."""
    path = Path(path).resolve()
    if path.is_file():
        path = path.parent
    if path.name == RUN_NATIVE_DIR:
        path = path.parent
    return path.name

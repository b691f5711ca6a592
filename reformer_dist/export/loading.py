"""Find and load the model to export, whatever kind of checkpoint the user points at.

``load_model_for_export(path)`` accepts

- a training run directory (``RUN_DIR``): its consolidated native checkpoint ``RUN_DIR/native``,
  written when training finishes (any ZeRO stage);
- a native directory: ``model.safetensors`` + ``config.yaml`` (+ ``tokenizer.json``, the tokenizer spec);
- a ``.safetensors`` file inside a native directory;
- a Hugging Face Reformer directory (``config.json`` + weights), converted by the model package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from reformer_dist.errors import CheckpointError

NATIVE_WEIGHTS = "model.safetensors"
NATIVE_CONFIG = "config.yaml"
NATIVE_TOKENIZER = "tokenizer.json"
RUN_NATIVE_DIR = "native"


@dataclass
class ExportSource:
    model: nn.Module
    """The ReformerLM, fp32, eval mode."""
    tokenizer: dict | None
    """The tokenizer spec (``reformer_dist.data.tokenizer``) if the checkpoint records one."""
    kind: str
    """'native' or 'hf'."""
    path: Path
    """The directory the weights came from."""


def load_model_for_export(path: str | os.PathLike) -> ExportSource:
    """Load the model behind ``path`` (see module doc); CheckpointError names what is missing."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _load_native(path.parent, path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if (path / RUN_NATIVE_DIR / NATIVE_WEIGHTS).is_file():
        return _load_native(path / RUN_NATIVE_DIR, path / RUN_NATIVE_DIR / NATIVE_WEIGHTS)
    if (path / NATIVE_WEIGHTS).is_file() and (path / NATIVE_CONFIG).is_file():
        return _load_native(path, path / NATIVE_WEIGHTS)
    from reformer_dist.model import hf_interop

    if hf_interop.is_hf_dir(path):
        return ExportSource(hf_interop.from_hf(path).eval(), _hf_tokenizer(path), "hf", path)
    if (path / "latest").is_file():
        raise CheckpointError(f"{path}: a training run without a consolidated model ({RUN_NATIVE_DIR}/"
                              f"{NATIVE_WEIGHTS}); it is written when training finishes")
    raise CheckpointError(f"{path}: not a run directory, a native model directory ({NATIVE_WEIGHTS} + "
                          f"{NATIVE_CONFIG}) or a Hugging Face Reformer directory (config.json + weights)")


def _load_native(directory: Path, weights: Path) -> ExportSource:
    import yaml
    from safetensors.torch import load_file

    from reformer_dist.model import ReformerConfig, ReformerLM

    config_file = directory / NATIVE_CONFIG
    if not config_file.is_file():
        raise CheckpointError(f"{directory}: {NATIVE_CONFIG} is missing next to {weights.name}")
    try:
        config = ReformerConfig(**yaml.safe_load(config_file.read_text())["model"])
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise CheckpointError(f"{config_file}: no valid model section ({e})") from None
    model = ReformerLM(config)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: weights do not match {config_file}: {e}") from None
    tokenizer = None
    if (directory / NATIVE_TOKENIZER).is_file():
        tokenizer = json.loads((directory / NATIVE_TOKENIZER).read_text())
        if "path" in tokenizer:  # stored relative to the directory
            tokenizer["path"] = str(directory / tokenizer["path"])
    return ExportSource(model.eval(), tokenizer, "native", directory)


def _hf_tokenizer(directory: Path) -> dict | None:
    for file, kind in (("tokenizer.json", "hf_tokenizers"), ("spiece.model", "sentencepiece")):
        if (directory / file).is_file():
            return {"kind": kind, "path": str(directory / file)}
    return None

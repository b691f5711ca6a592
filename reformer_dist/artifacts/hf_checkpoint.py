"""Hugging Face Reformer model directories: read one into a ReformerLM, write one ``transformers`` loads.

``from_hf(dir)`` reads a local ``ReformerModelWithLMHead`` (or ``ReformerForMaskedLM``) directory —
``config.json`` plus ``model.safetensors`` (single or sharded) or ``pytorch_model.bin`` (loaded with
``weights_only=True``) — into a ReformerLM whose LSH layers use the reference ``chunk`` window, so its
logits equal HF's. ``save_hf(model, dir)`` writes ``config.json`` + ``model.safetensors`` that
``transformers.ReformerModelWithLMHead.from_pretrained`` loads and runs unchanged. Neither needs
``transformers`` installed. How fields and weights correspond is ``reformer_dist.model.hf_mapping``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from reformer_dist.artifacts import tokenizer_spec
from reformer_dist.artifacts.files import inside, load_safetensors, read_json_object
from reformer_dist.atomic_write import atomic_write
from reformer_dist.errors import CheckpointError, describe
from reformer_dist.model.hf_mapping import config_from_hf, config_to_hf, state_dict_from_hf, state_dict_to_hf

if TYPE_CHECKING:
    from reformer_dist.model.reformer import ReformerLM

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding an HF ``config.json`` and weights."""
    path = Path(path)
    return (path / CONFIG).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory (CheckpointError if absent or malformed)."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no {CONFIG})")
    return read_json_object(file, "a model config")


def _load_weights(path: Path) -> dict[str, Tensor]:
    if (path / "model.safetensors").is_file():
        return load_safetensors(path / "model.safetensors")
    if (path / "model.safetensors.index.json").is_file():
        index_file = path / "model.safetensors.index.json"
        try:
            shards = sorted(set(read_json_object(index_file, "a safetensors index")["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_file}: not a safetensors index ({describe(e)})") from None
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_safetensors(inside(path, shard, index_file)))
        return state
    if (path / "pytorch_model.bin").is_file():
        try:
            state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling refuses anything but tensors and plain containers
            raise CheckpointError(f"{path / 'pytorch_model.bin'}: cannot be loaded safely ({describe(e)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path / 'pytorch_model.bin'}: not a state dict")
        return state
    raise CheckpointError(f"{path}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def from_hf(path: str | os.PathLike) -> ReformerLM:
    """A ReformerLM (eval mode, fp32) with the weights of the HF Reformer LM directory ``path``."""
    from reformer_dist.model.reformer import ReformerLM

    path = Path(path)
    try:
        cfg = config_from_hf(read_hf_config(path), str(path / CONFIG))
    except (ValueError, TypeError, AttributeError) as e:  # a field of the wrong type
        raise CheckpointError(f"{path / CONFIG}: not a valid Reformer config ({describe(e)})") from None
    model = ReformerLM(cfg)
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), path)
    model.load_state_dict(state_dict_from_hf(model, _load_weights(path), str(weights)))
    return model.eval()


def save_hf(model: ReformerLM, path: str | os.PathLike, tokenizer: dict[str, Any] | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` for ``transformers``' ``from_pretrained``, plus the
    tokenizer file (``spiece.model`` / ``tokenizer.json``) if ``tokenizer`` names one.

    Each file is written atomically; the config goes last, so a directory with a config is complete.
    """
    from safetensors.torch import save_file

    hf_config = config_to_hf(model.config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = state_dict_to_hf(model)
    atomic_write(path / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer_spec.write_hf(tokenizer, path)
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    atomic_write(path / CONFIG, lambda tmp: Path(tmp).write_text(text))

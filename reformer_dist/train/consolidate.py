"""Any ZeRO-stage checkpoint -> one fp32 ``ReformerLM`` state dict -> a native model directory.

The native directory (``model.safetensors`` + ``config.yaml`` + ``tokenizer.json``) is the model package's
format (``reformer_dist.model.native``: ``save_native`` / ``from_native``), what export and serving load
without DeepSpeed. This module only gets the weights out of a DeepSpeed checkpoint.

Weights come from DeepSpeed's fp32 master copies for ZeRO 1-3 (``zero_to_fp32``, which gathers every rank's
partition); a ZeRO-0 checkpoint holds the module itself, fp32 unless trained in bf16/fp16, where the 16-bit
weights the forward used are upcast (within one 16-bit rounding of the optimizer's master copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from reformer_dist.errors import CheckpointError
from reformer_dist.train.checkpoint import CONFIG_FILE, read_meta


def fp32_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 model weights of a complete checkpoint directory, on CPU, on one process."""
    meta = read_meta(checkpoint)
    if int(meta["zero_stage"]) == 0:
        # DeepSpeed's model-states file mixes tensors with plain Python containers; weights_only still loads it
        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return {name: t.float() for name, t in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    return {name: t.float() for name, t in state.items()}


def write_native(state_dict: dict[str, torch.Tensor], config_yaml: str, tokenizer: dict[str, Any],
                 out_dir: Path) -> Path:
    """Build the ReformerLM that ``config_yaml``'s ``model:`` section describes, load ``state_dict`` into it
    (strictly: weights that do not fit are refused) and save it as a native directory."""
    from reformer_dist.model import ReformerConfig, ReformerLM
    from reformer_dist.model.native import save_native

    model = ReformerLM(ReformerConfig(**yaml.safe_load(config_yaml)["model"]))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not match its model config: {e}") from None
    return save_native(model, out_dir, tokenizer)


def consolidate(checkpoint: Path, out_dir: Path) -> Path:
    """Checkpoint directory (any ZeRO stage, any world size) -> native directory ``out_dir``."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    config_yaml = (checkpoint / CONFIG_FILE).read_text()
    return write_native(fp32_state_dict(checkpoint), config_yaml, meta["tokenizer"], Path(out_dir))

"""Any ZeRO-stage checkpoint -> one fp32 ``ReformerLM`` state dict -> a native model directory.

The native directory (``model.safetensors`` + ``config.yaml`` + ``tokenizer.json``) is an artifact format
(``reformer_dist.artifacts.native``: ``save_native`` / ``from_native``), what export and serving load
without DeepSpeed. This module only gets the weights out of a DeepSpeed checkpoint.

Weights come from DeepSpeed's fp32 master copies for ZeRO 1-3 (``zero_to_fp32``, which gathers every rank's
partition); a ZeRO-0 checkpoint holds the module itself, fp32 unless trained in bf16/fp16, where the 16-bit
weights the forward used are upcast (within one 16-bit rounding of the optimizer's master copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reformer_dist.errors import CheckpointError, describe
from reformer_dist.train.checkpoint import CONFIG_FILE, read_meta, read_saved_config, verify_checkpoint_files


def fp32_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The fp32 model weights of a complete checkpoint directory, on CPU, on one process. Every file is
    read weights-only (``weights_only``); one that cannot be is refused with its name."""
    from reformer_dist.train import weights_only

    meta = read_meta(checkpoint)
    verify_checkpoint_files(checkpoint)
    if meta["zero_stage"] == 0:
        # DeepSpeed's model-states file mixes tensors with plain Python containers; weights_only loads it
        file = checkpoint / "mp_rank_00_model_states.pt"
        states = weights_only.load(file, required=("module",))
        try:
            return {name: t.float() for name, t in states["module"].items()}
        except (AttributeError, TypeError) as e:
            raise CheckpointError(f"{file}: its module entry is not a state dict ({describe(e)})") from None
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with weights_only.weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, FileNotFoundError) as e:
        # every file loaded (checked above) but their contents do not fit together, e.g. a shard swapped in
        raise CheckpointError(f"{checkpoint}: DeepSpeed cannot consolidate its files ({describe(e)})") from None
    return {name: t.float() for name, t in state.items()}


def write_native(state_dict: dict[str, torch.Tensor], config_yaml: str, tokenizer: dict[str, Any] | None,
                 out_dir: Path, source: str = "the run config") -> Path:
    """Build the ReformerLM that ``config_yaml``'s ``model:`` section describes, load ``state_dict`` into it
    (strictly: weights that do not fit are refused) and save it as a native directory. ``source`` names
    the config in errors."""
    from reformer_dist.artifacts.native import model_config_from_yaml, model_with_weights, save_native

    config = model_config_from_yaml(config_yaml, source)
    model = model_with_weights(config, state_dict, "the checkpoint's weights", f"its model config ({source})")
    return save_native(model, out_dir, tokenizer)


def consolidate(checkpoint: Path, out_dir: Path) -> Path:
    """Checkpoint directory (any ZeRO stage, any world size) -> native directory ``out_dir``."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    config_yaml = read_saved_config(checkpoint, meta)
    return write_native(fp32_state_dict(checkpoint), config_yaml, meta.get("tokenizer"), Path(out_dir),
                        str(checkpoint / CONFIG_FILE))

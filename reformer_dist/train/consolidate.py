"""Any ZeRO-stage checkpoint -> one fp32 ``ReformerLM`` state dict -> a *native* model directory.

A native directory is what export and serving load, with ``ReformerLM`` alone (no DeepSpeed)::

    model.safetensors   fp32 tensors named exactly as ReformerLM.state_dict(); metadata format=reformer-dist-native
    config.yaml         the resolved run config that trained it; its ``model:`` section builds the ReformerLM
    tokenizer.json      the tokenizer spec of the training data ({"kind": "bytes", "offset": 0}, or a kind
                        plus "path" naming a tokenizer file copied next to it)

Loading is ``ReformerLM(ReformerConfig(**yaml["model"]))`` + ``load_state_dict(safetensors, strict=True)``.

Weights come from DeepSpeed's fp32 master copies for ZeRO 1-3 (``zero_to_fp32``, which gathers every rank's
partition); a ZeRO-0 checkpoint holds the module itself, fp32 unless trained in bf16/fp16, where the 16-bit
weights the forward used are upcast (within one 16-bit rounding of the optimizer's master copy).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

from reformer_dist.errors import CheckpointError
from reformer_dist.train.checkpoint import CONFIG_FILE, read_meta

NATIVE_FORMAT = "reformer-dist-native"


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
    """Write a native directory (replacing ``out_dir`` only once the new one is complete)."""
    from safetensors.torch import save_file

    from reformer_dist.model import ReformerConfig, ReformerLM

    model_cfg = ReformerConfig(**yaml.safe_load(config_yaml)["model"])
    try:  # refuse to write weights that do not build the model the config describes
        ReformerLM(model_cfg).load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not match its model config: {e}") from None
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"),
              metadata={"format": NATIVE_FORMAT, "version": "1"})
    (tmp / CONFIG_FILE).write_text(config_yaml)
    tokenizer = dict(tokenizer)
    if "path" in tokenizer:  # copy the tokenizer file so the directory stands alone
        src = Path(tokenizer["path"])
        shutil.copy(src, tmp / src.name)
        tokenizer["path"] = src.name
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, indent=1) + "\n")
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def consolidate(checkpoint: Path, out_dir: Path) -> Path:
    """Checkpoint directory (any ZeRO stage, any world size) -> native directory ``out_dir``."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    config_yaml = (checkpoint / CONFIG_FILE).read_text()
    return write_native(fp32_state_dict(checkpoint), config_yaml, meta["tokenizer"], Path(out_dir))

"""The DeepSpeed JSON, generated from the typed run config.

The ``train:`` and ``deepspeed:`` sections are the single source of truth; this module turns them into
the dict handed to ``deepspeed.initialize`` (saved as ``ds_config.json`` in the run directory and printed
by ``reformer-dist config --deepspeed``). A user's own JSON (``deepspeed.config_file``) is merged over it
for the knobs we do not model (bucket sizes, ZeRO-3 prefetch, ...), but it may not contradict the keys
the typed config owns: the batch triple, the ZeRO stage and the precision are read elsewhere too
(resume logic, the data sampler, the non-finite-step guard), so a silent override would desynchronise them.

The learning-rate schedule is not in the JSON: DeepSpeed's ``WarmupCosineLR`` starts at lr 0 for its first
two steps and rejects zero warmup, so the trainer passes a torch ``LambdaLR`` (see ``deepspeed_engine.py``); a
``scheduler`` block in the user's JSON replaces it.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

from reformer_dist.errors import ConfigError
from reformer_dist.train.sequence_parallel import layout_for

if TYPE_CHECKING:
    from reformer_dist.run_config import JobConfig
    from reformer_dist.train.config import TrainConfig

# DeepSpeed key path -> the typed config key that owns it (a user JSON may repeat, never change, these).
OWNED_KEYS: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "train.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): "train.grad_accum",
    ("zero_optimization", "stage"): "deepspeed.zero_stage",
    ("bf16", "enabled"): "deepspeed.precision",
    ("fp16", "enabled"): "deepspeed.precision",
    ("sequence_parallel_size",): "deepspeed.sequence_parallel_size",
}


def global_batch_size(train: TrainConfig, replicas: int) -> int:
    """Samples per optimizer step: micro_batch_size x grad_accum x data-parallel replicas (the world size, or
    the number of sequence-parallel groups), checked against ``train.global_batch_size`` when the user
    pinned it (e.g. to keep a recipe's batch on a new cluster)."""
    product = train.micro_batch_size * train.grad_accum * replicas
    want = train.global_batch_size
    if want is not None and want != product:
        per_step = train.micro_batch_size * replicas
        hint = (f"; with {replicas} replica(s) use train.grad_accum={want // per_step}" if want % per_step == 0
                else f"; it must be a multiple of train.micro_batch_size x replicas = {per_step}")
        raise ConfigError("train.global_batch_size",
                          f"{want} != train.micro_batch_size ({train.micro_batch_size}) x train.grad_accum "
                          f"({train.grad_accum}) x data-parallel replicas ({replicas}) = {product}{hint}")
    return product


def build_deepspeed_config(cfg: JobConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg`` on ``world_size`` ranks (user JSON merged in); under sequence
    parallelism the batch triple counts the data-parallel groups, not the ranks."""
    if world_size < 1:
        raise ConfigError("--world-size", f"must be >= 1, got {world_size}")
    train, ds = cfg.train, cfg.deepspeed
    layout = layout_for(world_size, ds.sequence_parallel_size)
    offload = ds.offload_optimizer or ds.offload_params
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero["overlap_comm"] = ds.overlap_comm
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}

    out: dict[str, Any] = {
        "train_batch_size": global_batch_size(train, layout.data_parallel_size),
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW (no JIT-built kernel, fused where torch has one) unless states live on the
            # CPU, where DeepSpeed needs its own vectorised DeepSpeedCPUAdam.
            "params": {"lr": train.lr, "betas": list(train.betas), "eps": 1e-8,
                       "weight_decay": train.weight_decay, "torch_adam": not offload},
        },
        "zero_optimization": zero,
        # reformer-dist prints its own readout; DeepSpeed's per-step prints would interleave with it.
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }
    if layout.sequence_parallel_size > 1:
        # informational for DeepSpeed here (the trainer hands the groups over as ``mpu``), and it records
        # the layout in ds_config.json
        out["sequence_parallel_size"] = layout.sequence_parallel_size
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        # loss_scale 0 = dynamic: start at 2^16, halve after `hysteresis` overflowing steps (skipped),
        # double after `loss_scale_window` clean ones.
        out["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                       "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if ds.config_file:
        out = merge_user_config(out, load_user_config(ds.config_file))
    return out


def load_user_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            user = json.load(f)
    except FileNotFoundError:
        raise ConfigError("deepspeed.config_file", f"no such file {path!r}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError("deepspeed.config_file", f"cannot read {path!r} as JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError("deepspeed.config_file", f"{path!r} must hold a JSON object")
    return user


def merge_user_config(generated: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``generated`` with ``user`` merged over it (recursively for objects); owned keys may not change."""
    for path, owner in OWNED_KEYS.items():
        theirs, ours = _lookup(user, path), _lookup(generated, path)
        # an absent precision block means "disabled", so a user's explicit false agrees with it
        if theirs is not None and theirs != (ours if ours is not None else False):
            raise ConfigError(owner, f"deepspeed.config_file sets {'.'.join(path)}={json.dumps(theirs)} but the "
                                     f"run config gives {json.dumps(ours)}; set {owner} instead")

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
                else copy.deepcopy(value)
        return out

    return merge(generated, user)


def _lookup(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d

"""The DeepSpeed engine around a ReformerLM: training module, parameter groups, LR schedule, optimizer.

DeepSpeed's engine calls ``module.forward`` and hooks what it returns to drive gradient scaling,
accumulation and ZeRO's reductions, so the module it wraps must return the loss: ``TrainingReformerLM``
is a ``ReformerLM`` whose forward *is* the chunked-head loss (same parameter names, so checkpoints map 1:1
onto ``ReformerLM``). Evaluation calls the engine the same way (in eval mode): ZeRO-3 records the order in
which modules fetch their parameters, and a different call structure would invalidate that trace.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from reformer_dist.model import ReformerConfig, ReformerLM
from reformer_dist.train.config import TrainConfig


class TrainingReformerLM(ReformerLM):
    """``ReformerLM`` whose ``forward(input_ids, targets)`` returns the mean cross-entropy (a scalar)."""

    def forward(self, input_ids: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        return self.loss(input_ids, targets)


def build_model(config: ReformerConfig, seed: int) -> TrainingReformerLM:
    """The model with weights and private random streams drawn from ``seed``.

    Every rank builds the same model (DeepSpeed also broadcasts rank 0's weights) and the same private
    streams, as Megatron does for data-parallel ranks: LSH rotations are then the same on every rank,
    so N ranks compute exactly what one process computes on the same global batch.
    """
    torch.manual_seed(seed)
    model = TrainingReformerLM(config)
    model.set_tile_hook(hold_reduction_until_last_tile)
    return model


def hold_reduction_until_last_tile(parameters: Iterable[torch.nn.Parameter], last: bool) -> None:
    """The model's tile hook (``ReformerLM.set_tile_hook``): a reversible layer's backward accumulates a
    parameter's gradient once per tile (feed-forward chunk, head group); ZeRO-2/3 reduce a gradient as
    soon as it is accumulated and refuse a second one, unless DeepSpeed's ``ds_grad_is_ready`` says the
    accumulation is not complete yet (the flag DeepSpeed provides for tiled computations)."""
    for p in parameters:
        p.ds_grad_is_ready = last


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights) only: decaying biases and LayerNorm gains
    pulls them towards 0 for no regularisation benefit (as in GPT-2/nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer update ``step`` (0-based): linear warmup to 1 over
    ``warmup_steps`` updates (the first update already moves), then a cosine down to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(train: TrainConfig) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` calls with the optimizer it built. DeepSpeed steps
    it after every applied update (not after skipped ones) and saves its position in checkpoints."""
    def factor(step: int) -> float:
        return lr_factor(step, train.warmup_steps, train.max_steps, train.min_lr_ratio)

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips to ``max_norm``, reports the gradient norm and skips non-finite steps.

    DeepSpeed's ZeRO and mixed-precision wrappers do all three themselves; plain fp32 data parallel
    (ZeRO stage 0) hands ``step()`` straight to the torch optimizer, which would write NaN into the
    weights. The engine reads ``overflow`` (count the step as skipped, hold the LR schedule back) and
    ``_global_grad_norm`` from any optimizer, so this class speaks that protocol. Gradients are already
    all-reduced when ``step()`` runs, so every rank reaches the same decision without communicating.
    """

    def __init__(self, params: Any, max_norm: float, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self._global_grad_norm = float(norm)
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.max_norm > 0 and self._global_grad_norm > self.max_norm:
            # the same coefficient as torch.nn.utils.clip_grad_norm_ and DeepSpeed's ZeRO clipping
            torch._foreach_mul_(grads, self.max_norm / (self._global_grad_norm + 1e-6))
        return super().step(closure)


def initialize_engine(model: TrainingReformerLM, ds_config: dict[str, Any], train: TrainConfig,
                      mpu: Any = None) -> Any:
    """``deepspeed.initialize`` with our parameter groups and schedule; returns the engine. ``mpu``:
    DeepSpeed's sequence-parallel groups (``sequence_parallel.initialize``), or None."""
    import deepspeed

    from reformer_dist.train import weights_only

    ds_config = copy.deepcopy(ds_config)  # DeepSpeed annotates the dict it is given
    groups = param_groups(model, train.weight_decay)
    optimizer = None
    plain_fp32 = (ds_config["zero_optimization"]["stage"] == 0
                  and not ds_config.get("bf16", {}).get("enabled") and not ds_config.get("fp16", {}).get("enabled"))
    if plain_fp32:
        # the guarded optimizer takes over the generated optimizer block and the clipping (see its docstring)
        params = {k: v for k, v in ds_config.pop("optimizer")["params"].items() if k != "torch_adam"}
        params.pop("weight_decay", None)  # set per group
        optimizer = GuardedAdamW(groups, max_norm=ds_config.get("gradient_clipping", 0.0), **params)
        ds_config["gradient_clipping"] = 0.0  # explicitly: DeepSpeed's default is 1.0
    # a scheduler in the user's DeepSpeed JSON replaces the built-in warmup + cosine
    scheduler = None if "scheduler" in ds_config else scheduler_factory(train)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups if optimizer is None else None,
                                      optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu)
    weights_only.install(engine)  # checkpoints are read without unpickling code
    return engine

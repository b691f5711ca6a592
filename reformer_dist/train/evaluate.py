"""Validation: mean loss over a fixed slice of the validation split, perplexity, bits per byte."""

from __future__ import annotations

import math
from typing import Any

import torch

from reformer_dist.data import GlobalOrderSampler, TokenWindowDataset, next_batch
from reformer_dist.train.distributed import DistInfo
from reformer_dist.train.sequence_parallel import Layout


def evaluate(engine: Any, dataset: TokenWindowDataset, micro_batch_size: int, max_batches: int,
             dist_info: DistInfo, layout: Layout | None = None) -> dict[str, float]:
    """``val_loss`` (nats/token), ``val_ppl`` and, for byte-level data, ``val_bpb`` (bits per byte).

    Every evaluation reads the same windows (the split's first ones, in order, each rank its block of
    every global micro-batch; under sequence parallelism each group its block and each rank of a group its
    positions), so successive values are comparable. ``engine`` is the DeepSpeed engine,
    called exactly as in training but in eval mode (ZeRO-3 keeps its parameter-fetch trace), or on one
    process a bare ``TrainingReformerLM``. The model's private random streams are restored afterwards:
    LSH rotations are drawn on every call, and an evaluation must not change what training draws next
    (resumed and uninterrupted runs stay identical).
    """
    model = getattr(engine, "module", engine)  # a DeepSpeed engine or a bare TrainingReformerLM
    saved_rng = model.rng_state()
    layout = layout or Layout(dist_info.world_size, 1)
    per_step = micro_batch_size * layout.data_parallel_size
    n_batches = max(1, min(max_batches, len(dataset) // per_step))
    sampler = GlobalOrderSampler(len(dataset), seed=0, shuffle=False, rank=layout.data_parallel_rank(dist_info.rank),
                                 world_size=layout.data_parallel_size)
    part = layout.sequence_parallel_rank(dist_info.rank), layout.sequence_parallel_size
    total = torch.zeros((), dtype=torch.float64, device=dist_info.device)
    engine.eval()
    with torch.no_grad():
        for _ in range(n_batches):
            input_ids, targets = next_batch(dataset, sampler, micro_batch_size, *part)
            total += engine(input_ids.to(dist_info.device), targets.to(dist_info.device)).double()
    engine.train()
    model.set_rng_state(saved_rng)
    if dist_info.world_size > 1:
        torch.distributed.all_reduce(total)
    loss = float(total) / (n_batches * dist_info.world_size)  # every rank of a group holds its group's mean
    out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
    if dataset.tokenizer_spec.get("kind") == "bytes":  # one token per byte: nats/token -> bits/byte
        out["val_bpb"] = loss / math.log(2)
    return out

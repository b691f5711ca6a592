"""Validation: mean loss over a fixed slice of the validation split, perplexity, bits per byte; and a
short generated sample, the human-readable check of what those numbers mean."""

from __future__ import annotations

import math
from typing import Any

import torch

from reformer_dist.data import GlobalOrderSampler, TokenWindowDataset, next_batch
from reformer_dist.data.tokenizer import get_tokenizer
from reformer_dist.decoding import generate
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


SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 40
"""Decoding of training samples: top-k sampling, a little colder than the model's distribution."""


def generate_sample(engine: Any, tokenizer_spec: dict[str, Any], prompt: str, max_new_tokens: int, seed: int,
                    dist_info: DistInfo) -> str | None:
    """Rank 0's continuation of ``prompt`` (the generated text only; None on other ranks), decoded by
    ``reformer_dist.decoding.generate`` (the runtime's cached PyTorch backend and sampler, as ``reformer-dist
    generate`` and serving decode) with a fixed ``seed``, so successive samples differ only by what the
    model has learnt. At most ``max_new_tokens``, fewer where the prompt leaves less of
    ``model.max_seq_len``. Generation draws from its own generator: the model's random streams, and so
    the training run, are unaffected."""
    model = _whole_model(engine, dist_info)
    if model is None:
        return None
    tokenizer = get_tokenizer(tokenizer_spec)
    ids = tokenizer.encode(prompt)
    n_new = min(max_new_tokens, model.config.max_seq_len - len(ids))
    if n_new < 1:
        return ""
    new = generate(model, torch.tensor([ids], device=dist_info.device), n_new, temperature=SAMPLE_TEMPERATURE,
                   top_k=SAMPLE_TOP_K, seed=seed)
    return tokenizer.decode(new[0].tolist())


def _whole_model(engine: Any, dist_info: DistInfo) -> Any:
    """On rank 0 the model with whole parameters (None elsewhere): the engine's module itself, or under
    ZeRO-3, whose ranks each hold a slice of every parameter, a plain copy of the gathered weights (every
    rank takes part in the gathering; the copy's construction leaves the global RNG as it was)."""
    model = getattr(engine, "module", engine)
    if not getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        return model if dist_info.is_main else None
    import deepspeed

    from reformer_dist.model import ReformerLM

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        if not dist_info.is_main:
            return None
        with torch.random.fork_rng(devices=[]):
            copy = ReformerLM(model.config).to(dist_info.device)
        copy.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        return copy

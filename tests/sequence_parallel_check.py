"""One rank of the sequence-parallel gradient check (``test_train_sequence_parallel.py`` starts it with the
`deepspeed` launcher): every rank builds the same model twice, runs it on the whole batch as one process
would (the reference) and on its shard of each sequence through DeepSpeed-Ulysses exchanges, for a few
steps with dropout everywhere and fresh LSH rotations per call, and writes the differences as JSON. The
reversible backward is made to split attention into the smallest head groups (1 head in the reference,
P heads, i.e. one per rank, in the sharded model) and to take every buffer from its pass's pool, so
grouping, sharding and buffer reuse are checked together.

    deepspeed --num_gpus 2 tests/sequence_parallel_check.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from reformer_dist.model import ReformerConfig, ReformerLM, buffer_pool, reversible
from reformer_dist.train.distributed import init_distributed, shutdown
from reformer_dist.train.sequence_parallel import initialize

STEPS = 3


def build(window: str) -> ReformerLM:
    torch.manual_seed(0)  # same weights and private streams on every rank, as the trainer builds them
    config = ReformerConfig(
        vocab_size=64, d_model=32, n_heads=4, d_head=8, d_ff=48, n_layers=3, attn_layers=["local", "lsh", "full"],
        lsh_window=window, lsh_chunk_len=8, local_chunk_len=8, lsh_n_hashes=2, lsh_n_buckets=[4, 2],
        max_seq_len=64, axial_pos_shape=[8, 8], dropout=0.1, attn_dropout=0.1, local_attn_dropout=0.15,
        ff_chunk_size=12, loss_chunk_size=20)
    return ReformerLM(config).train()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 64, (2, 64), generator=g)
    targets = torch.randint(0, 64, (2, 64), generator=g)
    targets[1, 5:9] = -100  # ignored targets count in neither the sum nor the mean's denominator
    return ids, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--local_rank", type=int, default=None)  # the launcher's; LOCAL_RANK is read instead
    args = parser.parse_args()
    reversible.HEAD_GROUP_ELEMENTS = 1
    buffer_pool.POOLED_BYTES = 0  # every buffer through the passes' pools, the exchanged ones freed early too
    info = init_distributed(60.0)
    _, shard = initialize(dist.get_world_size())
    results = {}
    for window in ("bucket", "chunk"):
        ref, sharded = build(window), build(window)
        sharded.shard_sequence(shard)
        worst = {"loss": 0.0, "grad_abs": 0.0, "grad_rel": 0.0}
        for step in range(STEPS):
            ids, targets = batch(step)
            span = ids.shape[1] // shard.size
            part = slice(shard.rank * span, (shard.rank + 1) * span)
            for model in (ref, sharded):
                model.zero_grad()
            loss_ref = ref.loss(ids, targets)
            loss_ref.backward()
            loss_sp = sharded.loss(ids[:, part], targets[:, part])
            loss_sp.backward()
            worst["loss"] = max(worst["loss"], abs(loss_sp.item() - loss_ref.item()))
            for p_ref, p_sp in zip(ref.parameters(), sharded.parameters()):
                grad = p_sp.grad.clone()
                dist.all_reduce(grad)  # what the data-parallel reduction does within a group: sum the parts
                worst["grad_abs"] = max(worst["grad_abs"], (grad - p_ref.grad).abs().max().item())
                rel = ((grad - p_ref.grad).norm() / p_ref.grad.norm().clamp(min=1e-30)).item()
                worst["grad_rel"] = max(worst["grad_rel"], rel)
        # both consumed their private randomness identically (same rotations, seeds and masks drawn)
        worst["rng_equal"] = all(torch.equal(a, b) for a, b in zip(ref.rng_state().values(),
                                                                  sharded.rng_state().values()))
        results[window] = worst
    (args.out_dir / f"rank{info.rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()

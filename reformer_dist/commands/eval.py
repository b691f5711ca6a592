"""Evaluate a training checkpoint: loss, perplexity and bits per byte on a data split (one process).

CHECKPOINT is a run directory (its `latest` checkpoint) or one checkpoint directory
(run/checkpoints/step_XXXXXXXX) saved at any ZeRO stage on any number of ranks: its fp32 weights are
consolidated in memory and evaluated with a plain ReformerLM on GPU if there is one, else on CPU. The
model is built from the checkpoint's own config.yaml; key=value overrides apply on top (e.g.
data.path=... to evaluate on other prepared data, train.micro_batch_size=...).

Examples:
  reformer-dist eval runs/tiny
  reformer-dist eval runs/base/checkpoints/step_00010000 --split val --max-batches 0 --json
  reformer-dist eval runs/tiny data.verify_checksums=true   # hash the data files against the manifest first
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="run directory or checkpoint directory")
    parser.add_argument("--split", default=None, help="data split to evaluate (default: data.val_split)")
    parser.add_argument("--max-batches", type=int, default=0, metavar="N",
                        help="evaluate at most N micro-batches (default 0 = the whole split)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from reformer_dist.data import TokenWindowDataset
    from reformer_dist.errors import CheckpointError, describe
    from reformer_dist.run_config import load_config
    from reformer_dist.train.checkpoint import CONFIG_FILE, read_meta, read_saved_config, resolve_checkpoint
    from reformer_dist.train.consolidate import fp32_state_dict
    from reformer_dist.train.deepspeed_engine import TrainingReformerLM
    from reformer_dist.train.distributed import DistInfo
    from reformer_dist.train.evaluate import evaluate

    checkpoint = resolve_checkpoint(Path(args.checkpoint))
    meta = read_meta(checkpoint)
    read_saved_config(checkpoint, meta)  # present and unchanged since the save
    cfg = load_config([str(checkpoint / CONFIG_FILE)], args.overrides)
    split = args.split or cfg.data.val_split
    dataset = TokenWindowDataset(cfg.data.path, split, cfg.train.seq_len, verify_checksums=cfg.data.verify_checksums)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = TrainingReformerLM(cfg.model)
    try:
        model.load_state_dict(fp32_state_dict(checkpoint))
    except RuntimeError as e:
        raise CheckpointError(f"the weights of {checkpoint} do not match the model config "
                              f"({checkpoint / CONFIG_FILE} + overrides): {describe(e)}") from None
    model.to(device)
    solo = DistInfo(rank=0, local_rank=0, world_size=1, device=device, backend="none")
    max_batches = args.max_batches if args.max_batches > 0 else len(dataset)
    result = {"checkpoint": str(checkpoint), "step": meta["step"], "split": split,
              **evaluate(model, dataset, cfg.train.micro_batch_size, max_batches, solo)}
    if args.json:
        print(json.dumps(result))
    else:
        print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    return 0

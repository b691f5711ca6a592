"""The training loop. Parallelism is set up elsewhere (``distributed``, ``deepspeed_engine``): here it is only
``engine(inputs) -> loss``, ``engine.backward``, ``engine.step`` and a few scalars all-reduced per step.

One optimizer step::

    for each of grad_accum micro-batches:           this rank's block of the global micro-batch
        loss = engine(input_ids, targets)           TrainingReformerLM.forward = chunked-head loss
        engine.backward(loss); engine.step()        DeepSpeed reduces/steps at the accumulation boundary
    all-reduce [loss sum, stop votes]               global mean loss; every rank agrees to stop or not
    skipped (non-finite) steps are counted; K in a row end the run
    log / evaluate / checkpoint when due, or checkpoint and exit on a stop request
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from reformer_dist.artifacts.native import RUN_NATIVE_DIR
from reformer_dist.data import GlobalOrderSampler, TokenWindowDataset, load_manifest, next_batch
from reformer_dist.errors import ConfigError, ReformerDistError
from reformer_dist.model import buffer_pool
from reformer_dist.run_config import JobConfig, config_to_yaml, save_config
from reformer_dist.train import checkpoint as ckpt
from reformer_dist.train.consolidate import consolidate
from reformer_dist.train.deepspeed_config import build_deepspeed_config
from reformer_dist.train.deepspeed_engine import build_model, initialize_engine
from reformer_dist.train.distributed import (
    DistInfo,
    all_gather_float,
    barrier,
    init_distributed,
    rank_from_env,
    shutdown,
)
from reformer_dist.train.evaluate import evaluate, generate_sample
from reformer_dist.train.flops import peak_flops, token_flops
from reformer_dist.train.preemption import StopRequest
from reformer_dist.train.sequence_parallel import initialize as initialize_sequence_parallel
from reformer_dist.train.sequence_parallel import layout_for
from reformer_dist.train.tracking import Tracker, peak_memory_gib, readout_line


@dataclass
class TrainState:
    """Loop counters saved in every checkpoint (with the sampler position and the RNG streams)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    nonfinite_streak: int = 0


def open_datasets(cfg: JobConfig) -> tuple[TokenWindowDataset, TokenWindowDataset | None]:
    """Training and (if the manifest has enough tokens for one window) validation windows; checked before
    any process group exists, so a wrong data.path fails fast with a one-line error. With
    data.verify_checksums rank 0 hashes every file of the manifest; the other ranks then wait for it in the
    rendezvous, which a failed rank 0 never joins (the launcher ends them, or the rendezvous times out)."""
    verify = cfg.data.verify_checksums and rank_from_env(os.environ)[0] == 0
    train_ds = TokenWindowDataset(cfg.data.path, cfg.data.train_split, cfg.train.seq_len, verify_checksums=verify)
    if train_ds.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the vocabulary of "
                                              f"{cfg.data.path} ({train_ds.vocab_size} ids)")
    split = load_manifest(cfg.data.path)["splits"].get(cfg.data.val_split)
    has_val = split is not None and split["n_tokens"] >= cfg.train.seq_len + 1
    val_ds = TokenWindowDataset(cfg.data.path, cfg.data.val_split, cfg.train.seq_len) if has_val else None
    return train_ds, val_ds


def train(cfg: JobConfig) -> int:
    """Run (or resume) the training job ``cfg`` on this rank; returns the exit status."""
    # user errors (data, batch triple, DeepSpeed JSON) surface before any process group is formed
    train_ds, val_ds = open_datasets(cfg)
    rank, _, world_size = rank_from_env(os.environ)
    build_deepspeed_config(cfg, world_size)
    if rank == 0:  # a broken checkpoint is refused, naming the file, before the ranks gather
        ckpt.verify_resume_point(cfg.train.resume, Path(cfg.train.output_dir), world_size, cfg.deepspeed.zero_stage)
    dist_info = init_distributed(cfg.deepspeed.collective_timeout_s)
    try:
        return Trainer(cfg, dist_info, train_ds, val_ds).train()
    finally:
        shutdown()


class Trainer:
    def __init__(self, cfg: JobConfig, dist_info: DistInfo, train_ds: TokenWindowDataset,
                 val_ds: TokenWindowDataset | None):
        self.cfg, self.dist, self.train_ds, self.val_ds = cfg, dist_info, train_ds, val_ds
        t = cfg.train
        self.run_dir = Path(t.output_dir)
        self.ds_config = build_deepspeed_config(cfg, dist_info.world_size)
        self.config_yaml = config_to_yaml(cfg)

        # where to resume from, decided before the engine exists (a universal load is an engine option)
        found = ckpt.find_checkpoint(t.resume, self.run_dir)
        self.resume = None if found is None else \
            ckpt.plan_resume(found, dist_info.world_size, cfg.deepspeed.zero_stage, self.run_dir)
        self.checkpointer = ckpt.Checkpointer(self.run_dir, t.keep_last, dist_info)
        engine_config = dict(self.ds_config)
        if self.resume is not None and self.resume.universal_dir is not None:
            engine_config["checkpoint"] = {**engine_config.get("checkpoint", {}), "load_universal": True}
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.checkpointer.discard_incomplete()
            if self.resume is not None and self.resume.universal_dir is not None:
                ckpt.convert_to_universal(self.resume)
            save_config(cfg, self.run_dir / "config.yaml")
            ckpt.write_text_atomic(self.run_dir / "ds_config.json", json.dumps(engine_config, indent=2) + "\n")
        barrier()

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # our readout replaces its INFO chatter
        # DeepSpeed calls collectives torch has renamed; the deprecation notice is not actionable here
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.model = build_model(cfg.model, t.seed)
        # sequence parallelism: groups of consecutive ranks share each sample, each rank its positions
        self.layout = layout_for(dist_info.world_size, cfg.deepspeed.sequence_parallel_size)
        mpu, shard = initialize_sequence_parallel(self.layout.sequence_parallel_size)
        self.model.shard_sequence(shard)
        self.part = self.layout.sequence_parallel_rank(dist_info.rank), self.layout.sequence_parallel_size
        self.engine = initialize_engine(self.model, engine_config, t, mpu)
        self.sampler = GlobalOrderSampler(len(train_ds), seed=t.seed, shuffle=cfg.data.shuffle,
                                          rank=self.layout.data_parallel_rank(dist_info.rank),
                                          world_size=self.layout.data_parallel_size)
        self.state = TrainState()
        self.last_saved = -1
        if self.resume is not None:
            self._load(self.resume)

        self.global_batch = self.ds_config["train_batch_size"]
        self.flops = token_flops(cfg.model, t.seq_len)
        device_name = torch.cuda.get_device_name(dist_info.device) if dist_info.device.type == "cuda" else None
        self.peak = peak_flops(device_name, cfg.deepspeed.precision, cfg.logging.peak_tflops)
        self.tracker = Tracker(cfg, engine_config, self.run_dir, resumed=self.resume is not None,
                               start_step=self.state.step, active=dist_info.is_main)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _load(self, point: ckpt.ResumePoint) -> None:
        client = self.checkpointer.load(self.engine, point)["reformer_dist"]
        self.state = TrainState(**client["train_state"])
        self.sampler.load_state_dict(client["sampler"])
        self.last_saved = self.state.step if point.path.parent == self.checkpointer.root else -1

    def save(self) -> Path:
        client = {"reformer_dist": {"train_state": asdict(self.state), "sampler": self.sampler.state_dict(),
                                    "config": self.config_yaml}}
        meta = {"zero_stage": self.cfg.deepspeed.zero_stage, "precision": self.cfg.deepspeed.precision,
                "sequence_parallel_size": self.layout.sequence_parallel_size,
                "global_batch_size": self.global_batch, "tokens_seen": self.state.tokens_seen,
                "tokenizer": self.train_ds.tokenizer_spec}
        path = self.checkpointer.save(self.engine, self.state.step, client, meta, self.config_yaml)
        self.last_saved = self.state.step
        self.tracker.print(f"checkpoint {path}")
        return path

    # ------------------------------------------------------------------------------------------ the loop
    def train_step(self, stop: StopRequest) -> tuple[float, bool, str | None]:
        """One optimizer step: (global mean loss, whether the update was applied, agreed stop reason)."""
        t, dev = self.cfg.train, self.dist.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for _ in range(t.grad_accum):
            input_ids, targets = next_batch(self.train_ds, self.sampler, t.micro_batch_size, *self.part)  # (B, L/P)
            loss = self.engine(input_ids.to(dev), targets.to(dev))
            self.engine.backward(loss)
            self.engine.step()
            buffer_pool.return_free_heap(dev)  # CPU: what this micro-batch and the update left in the heap goes back
            loss_sum += loss.detach().double()
        votes = torch.stack([loss_sum, torch.tensor(float(stop.signalled), dtype=torch.float64, device=dev),
                             torch.tensor(float(stop.out_of_time), dtype=torch.float64, device=dev)])
        torch.distributed.all_reduce(votes)
        loss_mean = float(votes[0]) / (t.grad_accum * self.dist.world_size)  # a group's ranks hold its mean
        reason = None
        if votes[1] > 0:
            reason = f"{stop.signal_name} received" if stop.signalled else "stop signal received by a peer rank"
        elif votes[2] > 0:
            reason = f"time limit of {t.time_limit_minutes} min reached"
        return loss_mean, self.engine.was_step_applied(), reason

    def train(self) -> int:
        t = self.cfg.train
        if self.dist.is_main:
            self.tracker.print(self.config_yaml.rstrip())
            where = f"resuming from {self.resume.path} (step {self.state.step})" if self.resume else "starting"
            saved_batch = self.resume.meta.get("global_batch_size") if self.resume else None
            if saved_batch not in (None, self.global_batch):
                self.tracker.print(f"note: the global batch changes from {saved_batch} to {self.global_batch} "
                                   f"samples per step (the data position carries over, the LR schedule counts steps)")
            self.tracker.print(f"reformer-dist train: {where}; {self.dist.world_size} rank(s), "
                               f"ZeRO-{self.cfg.deepspeed.zero_stage}, {self.cfg.deepspeed.precision}, "
                               f"global batch {self.global_batch} x {t.seq_len} tokens -> {self.run_dir}")
            if self.layout.sequence_parallel_size > 1:
                self.tracker.print(f"sequence parallel: {self.layout.describe(t.seq_len, self.cfg.model.n_heads)}")
        stop = StopRequest(t.time_limit_minutes)
        try:
            reason = self._loop(stop)
        finally:
            stop.restore()
            self.tracker.close()
        if reason is not None:
            if self.dist.is_main:
                print(f"reformer-dist train: {reason}: checkpoint saved at step {self.state.step}, exiting",
                      flush=True)
            return 0
        if self.dist.is_main:
            latest = ckpt.latest_checkpoint(self.run_dir)
            native = consolidate(latest, self.run_dir / RUN_NATIVE_DIR)
            print(f"reformer-dist train: done at step {self.state.step}; consolidated model in {native}", flush=True)
        return 0

    def _loop(self, stop: StopRequest) -> str | None:
        """Train to max_steps (returns None) or until a stop request (returns its reason, after saving)."""
        t = self.cfg.train
        losses: list[float] = []  # applied steps' losses since the last readout
        steps, clock, excluded = 0, time.perf_counter(), 0.0  # evaluation and checkpoints are excluded
        last_eval = -1
        if self.val_ds is not None and t.eval_every and self.state.step == 0:
            self._evaluate()  # the untrained model's figure, the baseline the run improves on
        while self.state.step < t.max_steps:
            lr = self.engine.get_lr()[0]
            loss, applied, reason = self.train_step(stop)
            self.state.step += 1
            self.state.tokens_seen += self.global_batch * t.seq_len
            steps += 1
            if applied and math.isfinite(loss):
                self.state.nonfinite_streak = 0
                losses.append(loss)
            else:
                self.state.skipped_steps += 1
                self.state.nonfinite_streak += 1
            self.tracker.advance(self.state.step)

            final = self.state.step == t.max_steps
            diverged = self.state.nonfinite_streak >= t.max_nonfinite_steps
            if self.state.step % t.log_every == 0 or final or diverged:
                self._log(lr, losses, steps, time.perf_counter() - clock - excluded)
                losses, steps, clock, excluded = [], 0, time.perf_counter(), 0.0
            if diverged:
                raise ReformerDistError(
                    f"stopped at step {self.state.step}: {self.state.nonfinite_streak} steps in a row had a "
                    f"non-finite loss or gradients (all skipped). The last good checkpoint is "
                    f"{ckpt.latest_checkpoint(self.run_dir)}; lower train.lr, raise train.warmup_steps, use "
                    f"deepspeed.precision=bf16 or fp32, or check the data")
            side = time.perf_counter()
            if self.val_ds is not None and (final or (t.eval_every and self.state.step % t.eval_every == 0)):
                self._evaluate()
                last_eval = self.state.step
            if t.sample_every and (final or self.state.step % t.sample_every == 0):
                self._sample()
            # no scheduled checkpoint inside a run of skipped steps: keep-last-K must not rotate out the
            # checkpoints from before the trouble (a stop request still saves: the weights are unchanged)
            due = final or (t.save_every and self.state.step % t.save_every == 0)
            if reason is not None or (due and self.state.nonfinite_streak == 0):
                self.save()
            if reason is not None:
                return reason
            excluded += time.perf_counter() - side
        if self.last_saved != self.state.step:  # resumed at max_steps: make sure the end state is on disk
            self.save()
        if self.val_ds is not None and last_eval != self.state.step:
            self._evaluate()
        return None

    def _log(self, lr: float, losses: list[float], steps: int, elapsed: float) -> None:
        memory = all_gather_float(peak_memory_gib(self.dist.device), self.dist.device)  # every rank takes part
        grad_norm = self.engine.get_global_grad_norm()
        tokens_per_s = steps * self.global_batch * self.cfg.train.seq_len / max(elapsed, 1e-9)
        record: dict[str, Any] = {
            "step": self.state.step,
            "loss": sum(losses) / len(losses) if losses else float("nan"),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.state.skipped_steps,
            "memory_gib": memory,
            "eta_s": (self.cfg.train.max_steps - self.state.step) * elapsed / max(steps, 1),
        }
        if self.peak is not None:
            per_device = tokens_per_s / self.dist.world_size
            record["mfu"] = per_device * self.flops.model_per_token / self.peak
            record["hfu"] = per_device * self.flops.hardware_per_token / self.peak
        self.tracker.record(record)
        self.tracker.print(readout_line(record, self.cfg.train.max_steps))

    def _evaluate(self) -> None:
        result = evaluate(self.engine, self.val_ds, self.cfg.train.micro_batch_size, self.cfg.train.eval_batches,
                          self.dist, self.layout)
        self.tracker.record({"step": self.state.step, **result})
        self.tracker.print(f"eval step {self.state.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))

    def _sample(self) -> None:
        t = self.cfg.train
        text = generate_sample(self.engine, self.train_ds.tokenizer_spec, t.sample_prompt, t.sample_tokens, t.seed,
                               self.dist)
        if text is not None:
            self.tracker.sample(self.state.step, t.sample_prompt + text)

"""Rank 0's view of a run: the readout line, the progress bar, ``metrics.jsonl`` and Weights & Biases.

Every log interval produces one record, written to all three sinks::

    step 120/300 | loss 2.4817 | gnorm 0.91 | lr 1.86e-03 | 21.4k tok/s | mfu 31.2% hfu 41.0% | mem 1.21 GiB | eta 2m10s

W&B (``logging.wandb``) gets the resolved run config and the generated DeepSpeed config at init, the
same records, and its own system statistics. The run id is stored in the run directory (``wandb_id``),
so a run that resumes from a checkpoint continues the same W&B run; a fresh start gets a new id.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from reformer_dist.train.checkpoint import write_text_atomic
from reformer_dist.train.config import LoggingConfig, WandbConfig

WANDB_ID_FILE = "wandb_id"
METRICS_FILE = "metrics.jsonl"


def format_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def readout_line(r: dict[str, Any], max_steps: int) -> str:
    """One line for a training record (keys as written to metrics.jsonl)."""
    parts = [f"step {r['step']}/{max_steps}", f"loss {r['loss']:.4f}"]
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.2f}")
    parts += [f"lr {r['lr']:.2e}", f"{format_count(r['tokens_per_s'])} tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}% hfu {100 * r['hfu']:.1f}%")
    parts.append(f"mem {max(r['memory_gib']):.2f} GiB")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    parts.append(f"eta {format_duration(r['eta_s'])}")
    return " | ".join(parts)


class Tracker:
    """Rank 0's sinks; on other ranks every method is a no-op (they never construct the sinks)."""

    def __init__(self, cfg: Any, ds_config: dict[str, Any], run_dir: Path, resumed: bool, start_step: int,
                 active: bool):
        self.active, self.max_steps = active, cfg.train.max_steps
        self.run_dir = run_dir
        self._wandb = self._progress = self._task = None
        self._samples: list[list[Any]] = []  # (step, text) rows of the W&B samples table
        if not active:
            return
        # open for the whole run (closed in close()); a resumed run appends, readers keep the last per step
        self._jsonl = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115
        log: LoggingConfig = cfg.logging
        if log.progress_bar and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                                      TimeRemainingColumn())
            self._task = self._progress.add_task("train", total=self.max_steps, completed=start_step)
            self._progress.start()
        wandb_cfg = log.wandb.resolve(os.environ)  # unset keys follow WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY
        if wandb_cfg.mode != "disabled":
            self._wandb = self._init_wandb(cfg, wandb_cfg, ds_config, resumed)

    def _init_wandb(self, cfg: Any, w: WandbConfig, ds_config: dict[str, Any], resumed: bool) -> Any:
        import wandb
        from omegaconf import OmegaConf

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else secrets.token_hex(6)
        write_text_atomic(id_file, run_id + "\n")
        config = OmegaConf.to_container(OmegaConf.structured(cfg))
        config["logging"]["wandb"] = OmegaConf.to_container(OmegaConf.structured(w))  # what was used
        run = wandb.init(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags) or None,
                         mode=w.mode, dir=str(self.run_dir), id=run_id, resume="allow", name=self.run_dir.name,
                         config={**config, "ds_config": ds_config})
        if w.mode == "offline":
            self.print(f"W&B: offline run {run_id} in {run.settings.sync_dir} "
                       f"(upload it with `wandb sync {run.settings.sync_dir}`)")
        else:
            self.print(f"W&B: run {run_id} at {run.url}")
        return run

    def print(self, line: str) -> None:
        if not self.active:
            return
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        """Append a record (training or evaluation) to metrics.jsonl and W&B."""
        if not self.active:
            return
        record = {**record, "time": time.time()}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time", "memory_gib")
                             and isinstance(v, (int, float)) and math.isfinite(v)} |
                            {f"memory_gib/rank{i}": m for i, m in enumerate(record.get("memory_gib", []))},
                            step=record["step"])

    def sample(self, step: int, text: str) -> None:
        """Print a generated sample (prompt included) and append it to metrics.jsonl and W&B, where the
        ``samples`` table holds every sample of the run so far, one row per step."""
        if not self.active:
            return
        self.print(f"sample step {step} |\n{text}\n" + "-" * 40)
        self._jsonl.write(json.dumps({"step": step, "sample": text, "time": time.time()}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            import wandb

            self._samples.append([step, text])
            self._wandb.log({"samples": wandb.Table(columns=["step", "text"], data=list(self._samples))}, step=step)

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def close(self) -> None:
        if not self.active:
            return
        if self._progress is not None:
            self._progress.stop()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def peak_memory_gib(device: Any) -> float:
    """This process's peak memory: allocated CUDA memory on GPU, resident set size on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


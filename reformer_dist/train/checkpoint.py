"""Checkpoints that survive a crash at any moment and resume exactly.

Layout of a run directory::

    checkpoints/step_00000100/    DeepSpeed's files (save_checkpoint, tag = directory name),
                                  rng_rank00000.pt ... one per rank, config.yaml, meta.json (written last)
    latest                        "step_00000100": the newest *complete* checkpoint
    universal/step_00000100/      a checkpoint converted for another world size / ZeRO stage (transient)

A checkpoint is complete once rank 0 has written ``meta.json``, after every rank finished its shard and
its RNG file; only then is ``latest`` replaced (atomically: temp file + rename). A process killed while
writing leaves ``latest`` on the previous checkpoint, which is what ``train.resume=auto`` loads; the next
launch deletes the incomplete directory before training. ``train.resume=never`` refuses a run directory
that already holds checkpoints rather than overwrite them.

Why per-rank RNG files: DeepSpeed saves no Python/numpy/torch RNG state, and under ZeRO 0-2 the
``client_state`` is written by rank 0 alone, so each rank stores its own streams next to its shard.

Resuming on another world size or ZeRO stage goes through DeepSpeed's universal checkpoint format: rank 0
converts the checkpoint once into ``universal/`` (``deepspeed.checkpoint.ds_to_universal``), every rank
loads it with ``checkpoint.load_universal``, which re-partitions weights *and* optimizer states, and the
conversion is deleted after this run's first checkpoint. The data position is a global sample count, so
it carries over unchanged; ranks without an RNG file of their own take rank 0's (every rank starts from
the same streams anyway, see ``engine.build_model``). Only ZeRO-0 <-> ZeRO >= 1 is not convertible.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reformer_dist import atomic_write
from reformer_dist.errors import CheckpointError, describe
from reformer_dist.train.distributed import DistInfo, barrier

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
CONFIG_FILE = "config.yaml"  # the resolved run config, in checkpoint and native directories alike
UNIVERSAL = "universal"
FORMAT = "reformer-dist-checkpoint"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    """The step of a ``step_XXXXXXXX`` directory name, None for anything else."""
    prefix, _, digits = tag.partition("_")
    return int(digits) if prefix == "step" and digits.isdigit() else None


def write_text_atomic(path: Path, text: str) -> None:
    """Checkpoint records (meta.json, latest) mark other files complete: on disk before they are named."""
    atomic_write.write_text_atomic(path, text, fsync=True)


def save_torch_atomic(obj: Any, path: Path) -> None:
    atomic_write.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_meta(path: Path) -> dict[str, Any]:
    """The completion record of checkpoint directory ``path``; CheckpointError if it is not complete."""
    file = path / META
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}: the save was interrupted, "
                              f"or this is not a reformer-dist checkpoint directory)") from None
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise CheckpointError(f"{file} is unreadable: {describe(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a {FORMAT} record")
    bad = [key for key in ("step", "world_size", "zero_stage") if type(meta.get(key)) is not int]
    if bad:
        raise CheckpointError(f"{file} is malformed: {', '.join(bad)} missing or not an integer")
    return meta


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``run_dir/latest`` points to, None if there is no pointer yet."""
    file = run_dir / LATEST
    try:
        tag = file.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file} is unreadable: {describe(e)}") from None
    if step_of(tag) is None or not (run_dir / CHECKPOINTS / tag).is_dir():
        raise CheckpointError(f"{file} does not name a checkpoint of this run (it holds {tag[:40]!r}; "
                              f"expected a directory name step_XXXXXXXX under {run_dir / CHECKPOINTS})")
    return run_dir / CHECKPOINTS / tag


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's latest checkpoint."""
    if (path / LATEST).is_file():
        return latest_checkpoint(path)  # type: ignore[return-value]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` asks for: 'never' -> None, 'auto' -> this run's latest (None if
    it has none), else a checkpoint directory or a run directory (its latest)."""
    if resume == "never":
        if (run_dir / LATEST).is_file():
            raise CheckpointError(f"train.resume=never, but {run_dir} already holds checkpoints (latest: "
                                  f"{run_dir / LATEST}): use a new train.output_dir, delete this one, "
                                  f"or resume with train.resume=auto")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if not Path(resume).exists():
        raise CheckpointError(f"train.resume={resume!r}: no such checkpoint or run directory")
    return resolve_checkpoint(Path(resume))


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_saved_config(path: Path, meta: dict[str, Any]) -> str:
    """The run config saved in checkpoint ``path``, checked against the hash its ``meta.json`` records (a
    truncated YAML file can still parse, and silently fall back to defaults)."""
    file = path / CONFIG_FILE
    try:
        text = file.read_text()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({describe(e)})") from None
    if "config_sha256" in meta and _sha256(text) != meta["config_sha256"]:
        raise CheckpointError(f"{file} was modified or damaged after the checkpoint was saved (its sha256 "
                              f"differs from the one in {path / META}); pass changes as key=value overrides")
    return text


def verify_resume_point(resume: str, run_dir: Path, world_size: int, zero_stage: int) -> None:
    """Check the checkpoint ``train.resume`` picks (if any) before training starts: complete, loadable
    by this world size and ZeRO stage, every file loadable (a universal conversion it reuses included)."""
    found = find_checkpoint(resume, run_dir)
    if found is None:
        return
    point = plan_resume(found, world_size, zero_stage, run_dir)
    verify_checkpoint_files(point.path)
    if point.universal_dir is not None and (point.load_dir / point.tag / META).is_file():
        verify_checkpoint_files(point.load_dir / point.tag)  # left by an earlier launch, loaded as it is


# DeepSpeed's files (model states, ZeRO optimizer partitions) and ours: the keys each must hold
_REQUIRED_KEYS = (("model_states.pt", ("module",)), ("optim_states.pt", ("optimizer_state_dict",)),
                  ("optimizer_state.pt", ("param_groups",)), ("rng_rank", ("python", "numpy", "torch", "model")))


def required_keys(file: Path) -> tuple[str, ...]:
    return next((keys for pattern, keys in _REQUIRED_KEYS if pattern in file.name), ())


def verify_checkpoint_files(path: Path) -> None:
    """Open every ``.pt`` file of checkpoint directory ``path`` (universal conversions included) the way
    DeepSpeed will, weights-only, mapping rather than reading the tensors: a truncated, foreign or unsafe
    file is refused with its name before any process group or engine exists."""
    from reformer_dist.train import weights_only

    for file in sorted(path.rglob("*.pt")):
        weights_only.load(file, required=required_keys(file), mmap=True)


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    """The checkpoint directory (``.../checkpoints/step_XXXXXXXX``)."""
    meta: dict[str, Any]
    """Its completion record: step, world_size, zero_stage, ..."""
    universal_dir: Path | None
    """Where its universal conversion goes when the world size or the ZeRO stage changed, else None."""

    @property
    def load_dir(self) -> Path:
        return self.universal_dir if self.universal_dir is not None else self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name


def plan_resume(path: Path, world_size: int, zero_stage: int, run_dir: Path) -> ResumePoint:
    """Check that checkpoint ``path`` is complete and decide how this run can load it."""
    meta = read_meta(path)
    saved_ws, saved_stage = int(meta["world_size"]), int(meta["zero_stage"])
    if saved_stage == zero_stage and (saved_ws == world_size or zero_stage == 0):
        return ResumePoint(path, meta, None)  # ZeRO-0 checkpoints hold whole optimizer states
    if saved_stage == 0 or zero_stage == 0:
        raise CheckpointError(f"{path} was saved with deepspeed.zero_stage={saved_stage} on {saved_ws} rank(s); "
                              f"this run has zero_stage={zero_stage} on {world_size}: converting between ZeRO-0 "
                              f"and ZeRO >= 1 is not supported, resume with deepspeed.zero_stage={saved_stage}")
    return ResumePoint(path, meta, run_dir / UNIVERSAL)


def convert_to_universal(point: ResumePoint) -> None:
    """Rank 0: write the universal form of ``point`` (once; an interrupted conversion is redone).
    DeepSpeed's converter reads the checkpoint weights-only (see ``weights_only``)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from reformer_dist.train.weights_only import weights_only_loads

    out = point.load_dir / point.tag
    if (out / META).is_file():
        return
    with atomic_write.atomic_directory(out) as tmp:
        args = type("Args", (), dict(input_folder=str(point.path), output_folder=str(tmp), num_extract_workers=1,
                                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                                     inject_missing_state=True))()
        with weights_only_loads():
            ds_to_universal(args)
        shutil.copy(point.path / META, tmp / META)  # marks the conversion complete


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng(model: Any) -> dict[str, Any]:
    """Every random stream this process owns: Python, numpy, torch CPU/CUDA and the model's private ones."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "model": model.rng_state(),
    }


def restore_rng(state: dict[str, Any], model: Any) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    model.set_rng_state(state["model"])


def rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------- save/load
class Checkpointer:
    """Saves and loads a run's checkpoints (all ranks call every method; rank 0 does the bookkeeping)."""

    def __init__(self, run_dir: Path, keep_last: int, dist_info: DistInfo):
        self.run_dir, self.keep_last, self.dist = run_dir, keep_last, dist_info
        self.root = run_dir / CHECKPOINTS

    def discard_incomplete(self) -> None:
        """Rank 0, before training: delete checkpoint directories a killed save left without ``meta.json``."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if step_of(p.name) is not None and not (p / META).is_file():
                    shutil.rmtree(p)

    def save(self, engine: Any, step: int, client_state: dict[str, Any], meta: dict[str, Any],
             config_yaml: str) -> Path:
        """Write checkpoint ``step``, mark it complete, move ``latest`` to it, prune old ones.
        ``meta`` goes into the completion record, ``config_yaml`` (the resolved run config) next to it."""
        tag = tag_for(step)
        path = self.root / tag
        if self.dist.is_main and (path / META).is_file():
            shutil.rmtree(path)  # a complete checkpoint of a branch abandoned by resuming from an older one
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        save_torch_atomic(capture_rng(engine.module), rng_file(path, self.dist.rank))
        barrier()  # every shard and RNG file is on disk
        if self.dist.is_main:
            write_text_atomic(path / CONFIG_FILE, config_yaml)
            record = {"format": FORMAT, "version": 1, "step": step, "world_size": self.dist.world_size,
                      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config_sha256": _sha256(config_yaml),
                      **meta}
            write_text_atomic(path / META, json.dumps(record, indent=1) + "\n")
            write_text_atomic(self.run_dir / LATEST, tag + "\n")
            shutil.rmtree(self.run_dir / UNIVERSAL, ignore_errors=True)  # a resume conversion is now obsolete
            self._prune(step)
        return path

    def _prune(self, current: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints up to ``current``; delete the older ones.
        Directories past ``current`` (a branch abandoned by a rollback) are left to be overwritten."""
        complete = sorted(s for p in self.root.iterdir()
                          if (s := step_of(p.name)) is not None and s <= current and (p / META).is_file())
        for s in complete[:-self.keep_last]:
            shutil.rmtree(self.root / tag_for(s), ignore_errors=True)

    def load(self, engine: Any, point: ResumePoint) -> dict[str, Any]:
        """Load ``point`` into ``engine`` and this rank's RNG streams; returns the client state.
        Every file is read weights-only (``weights_only``), a universal conversion's files included."""
        from reformer_dist.train import weights_only

        with weights_only.weights_only_loads():
            loaded, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {point.load_dir / point.tag}")
        own = rng_file(point.path, self.dist.rank)
        file = own if own.is_file() else rng_file(point.path, 0)
        state = weights_only.load(file, required=required_keys(file))
        try:
            restore_rng(state, engine.module)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: not a reformer-dist RNG state ({describe(e)})") from None
        if self.dist.is_main and point.path.parent == self.root and latest_checkpoint(self.run_dir) != point.path:
            # resuming from an older checkpoint of this run (a rollback): make it the resume point, so a
            # crash before the next save comes back here, and the newer ones are overwritten as we go
            write_text_atomic(self.run_dir / LATEST, point.tag + "\n")
        return client

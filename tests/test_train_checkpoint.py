"""Checkpoint bookkeeping without a launcher: what `train.resume` picks, how a checkpoint of another world
size or ZeRO stage is loaded, keep-last-K, incomplete directories, RNG capture, native directories.
(Saving and loading through DeepSpeed is exercised by test_train_distributed.py.)"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reformer_dist.artifacts.native import from_native
from reformer_dist.errors import CheckpointError
from reformer_dist.model import ReformerLM
from reformer_dist.run_config import config_to_yaml, load_config
from reformer_dist.train import checkpoint as ckpt
from reformer_dist.train.consolidate import write_native
from reformer_dist.train.distributed import DistInfo


def fake_checkpoint(run_dir: Path, step: int, world_size: int = 2, zero_stage: int = 2, complete: bool = True) -> Path:
    path = run_dir / "checkpoints" / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / ckpt.META).write_text(json.dumps({"format": ckpt.FORMAT, "step": step, "world_size": world_size,
                                                  "zero_stage": zero_stage}))
    return path


def point_latest(run_dir: Path, step: int) -> None:
    (run_dir / ckpt.LATEST).write_text(ckpt.tag_for(step) + "\n")


def test_resume_auto_picks_latest_never_refuses_existing_checkpoints_and_paths_resolve(tmp_path):
    run = tmp_path / "run"
    assert ckpt.find_checkpoint("auto", run) is None  # fresh run
    assert ckpt.find_checkpoint("never", run) is None
    fake_checkpoint(run, 100)
    second = fake_checkpoint(run, 200)
    point_latest(run, 200)
    assert ckpt.find_checkpoint("auto", run) == second
    assert ckpt.find_checkpoint(str(run), tmp_path / "other") == second  # a run directory means its latest
    assert ckpt.find_checkpoint(str(run / "checkpoints" / "step_00000100"), run).name == "step_00000100"
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        ckpt.find_checkpoint("never", run)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.find_checkpoint(str(tmp_path / "missing"), run)


def test_an_interrupted_save_is_not_loadable_and_is_discarded_at_startup(tmp_path):
    run = tmp_path / "run"
    good = fake_checkpoint(run, 100)
    partial = fake_checkpoint(run, 200, complete=False)
    point_latest(run, 100)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.plan_resume(partial, 2, 2, run)
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    ckpt.Checkpointer(run, keep_last=3, dist_info=info).discard_incomplete()
    assert good.is_dir() and not partial.exists()


def test_resume_plan_converts_only_when_the_partitioning_changes(tmp_path):
    run = tmp_path / "run"
    z2 = fake_checkpoint(run, 10, world_size=2, zero_stage=2)
    assert ckpt.plan_resume(z2, 2, 2, run).universal_dir is None
    changed = ckpt.plan_resume(z2, 1, 2, run)  # 2 -> 1 ranks
    assert changed.universal_dir == run / "universal" and changed.load_dir == run / "universal"
    assert ckpt.plan_resume(z2, 2, 3, run).universal_dir is not None  # ZeRO-2 -> ZeRO-3
    z0 = fake_checkpoint(run, 20, world_size=2, zero_stage=0)
    assert ckpt.plan_resume(z0, 4, 0, run).universal_dir is None  # ZeRO-0 holds whole optimizer states
    with pytest.raises(CheckpointError, match="zero_stage=0"):
        ckpt.plan_resume(z0, 2, 1, run)


def test_keep_last_prunes_older_complete_checkpoints_only(tmp_path):
    run = tmp_path / "run"
    for step in (10, 20, 30, 40):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 50)  # a newer one from a branch abandoned by a rollback to 40: left to be overwritten
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    ckpt.Checkpointer(run, keep_last=2, dist_info=info)._prune(current=40)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000030", "step_00000040",
                                                                      "step_00000050"]


def test_rng_capture_restores_every_stream_and_loads_with_weights_only(tmp_path):
    cfg = load_config(["tiny"], ["model.dropout=0.2", "model.n_layers=2", "model.attn_layers=[lsh]"]).model
    torch.manual_seed(0)
    model = ReformerLM(cfg).train()
    x = torch.randint(0, 256, (1, 64))

    def draws():
        return (random.random(), np.random.rand(), torch.rand(1).item(), model(x).sum().item())

    state = ckpt.capture_rng(model)
    ckpt.save_torch_atomic(state, tmp_path / "rng.pt")
    first = draws()
    assert draws() != first  # the streams moved on
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), model)
    assert draws() == first


def test_native_directory_holds_loadable_fp32_weights_config_and_tokenizer(tmp_path):
    cfg = load_config(["tiny"], ["model.n_layers=2"])
    torch.manual_seed(0)
    weights = {k: v.clone() for k, v in ReformerLM(cfg.model).state_dict().items()}
    out = write_native(weights, config_to_yaml(cfg), {"kind": "bytes", "offset": 0}, tmp_path / "native")
    loaded = from_native(out)
    assert loaded.config.n_layers == 2
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    assert load_file(str(out / "model.safetensors")).keys() == weights.keys()
    assert json.loads((out / "tokenizer.json").read_text()) == {"kind": "bytes", "offset": 0}

    weights.pop(next(iter(weights)))
    with pytest.raises(CheckpointError, match="do not match"):
        write_native(weights, config_to_yaml(cfg), {"kind": "bytes", "offset": 0}, tmp_path / "native")
    assert (out / "model.safetensors").is_file()  # the previous directory survives a refused write

"""W&B follows its environment variables (WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY) wherever the run config
leaves a key unset, as W&B users expect; a key the config sets wins. The tracker says where the run went."""

from __future__ import annotations

import pytest
from wandb_records import history_rows, read_records

from reformer_dist.errors import ConfigError
from reformer_dist.run_config import load_config
from reformer_dist.train.config import WandbConfig
from reformer_dist.train.tracking import Tracker


def test_unset_keys_follow_the_environment_set_keys_win():
    env = {"WANDB_MODE": "offline", "WANDB_PROJECT": "from-env", "WANDB_ENTITY": "team"}
    assert WandbConfig().resolve(env) == WandbConfig(mode="offline", project="from-env", entity="team")
    assert WandbConfig(mode="disabled", project="mine").resolve(env) == \
        WandbConfig(mode="disabled", project="mine", entity="team")
    assert WandbConfig().resolve({}) == WandbConfig(mode="disabled", project="reformer-dist", entity=None)
    assert WandbConfig().resolve({"WANDB_MODE": "dryrun"}).mode == "offline"  # W&B's older spelling
    with pytest.raises(ConfigError, match="WANDB_MODE: must be online, offline or disabled, got 'sometimes'"):
        WandbConfig().resolve({"WANDB_MODE": "sometimes"})


def test_wandb_mode_offline_in_the_environment_records_the_loss_history(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(["tiny"], [f"train.output_dir={tmp_path}", "train.max_steps=3"])  # tiny sets no wandb key
    tracker = Tracker(cfg, {"train_batch_size": 8}, tmp_path, resumed=False, start_step=0, active=True)
    for step, loss in ((1, 5.5), (2, 4.25), (3, 3.0)):
        tracker.record({"step": step, "loss": loss, "lr": 1e-3, "tokens_per_s": 100.0, "memory_gib": [0.5]})
    tracker.close()
    runs = list(tmp_path.glob("wandb/offline-run-*"))
    assert len(runs) == 1 and f"W&B: offline run {(tmp_path / 'wandb_id').read_text().strip()} in {runs[0]}" \
        in capsys.readouterr().out
    rows = history_rows(read_records(next(runs[0].glob("run-*.wandb"))))
    assert {int(row["_step"]): row["loss"] for row in rows if "loss" in row} == {1: 5.5, 2: 4.25, 3: 3.0}

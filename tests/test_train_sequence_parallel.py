"""Sequence parallelism (DeepSpeed-Ulysses) on CPU gloo ranks through the real `deepspeed` launcher: a sharded
model computes one process's loss and every gradient; 2 ranks sharing each sequence, and 2 x 2 ranks with
ZeRO-2, train like one process; a sequence-parallel checkpoint resumes on one process and a one-process
checkpoint on a sequence-parallel pair; bad layouts are refused naming the key.

Runs reuse test_train_distributed's micro config and corpus (2 heads: one per rank of a pair), 10 steps
with a checkpoint every 5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_train_distributed as distributed
from test_train_distributed import DEEPSPEED, ENV, REPO, free_port, launcher, max_diff, run_ok, single

from reformer_dist.errors import ConfigError
from reformer_dist.run_config import load_config
from reformer_dist.train.deepspeed_config import build_deepspeed_config

STEPS = 10
SHORT = (f"train.max_steps={STEPS}", "train.save_every=5")
# the micro config and its corpus, as module fixtures of this module too
workdir, config = distributed.workdir, distributed.config


def step_records(run_dir: Path, key: str) -> dict[int, float]:
    """step -> ``key`` from metrics.jsonl (a resumed run appends: the last record of a step wins)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


@pytest.fixture(scope="module")
def reference(config: Path, workdir: Path) -> Path:
    """One process, micro-batch 2 (ZeRO-1): what every sequence-parallel run must reproduce."""
    run_ok(single(config, workdir / "sp-ref", *SHORT, "deepspeed.zero_stage=1"))
    return workdir / "sp-ref"


@pytest.fixture(scope="module")
def pair(config: Path, workdir: Path) -> Path:
    """2 ranks sharing each sample (sequence_parallel_size=2: one data-parallel replica), ZeRO-1."""
    run_ok(launcher(2, config, workdir / "sp2", *SHORT, "deepspeed.sequence_parallel_size=2", "deepspeed.zero_stage=1"))
    return workdir / "sp2"


def test_sharded_model_gives_one_process_loss_and_every_gradient_with_dropout(workdir):
    # bucket and chunk LSH windows, local and full attention, dropout on every branch and on the attention
    # probabilities, fresh rotations per call, 3 steps: each rank holds half of every sequence, and two of
    # the four heads inside attention (tests/sequence_parallel_check.py)
    out = workdir / "gradcheck"
    out.mkdir()
    run_ok([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()),
            str(REPO / "tests" / "sequence_parallel_check.py"), str(out)])
    for rank in (0, 1):
        results = json.loads((out / f"rank{rank}.json").read_text())
        for window in ("bucket", "chunk"):
            r = results[window]
            assert r["loss"] <= 1e-5 and r["grad_abs"] <= 1e-5 and r["grad_rel"] <= 1e-5, (rank, window, r)
            assert r["rng_equal"], (rank, window)


def test_two_ranks_sharing_each_sequence_train_like_one_process(pair, reference):
    assert max_diff(step_records(pair, "loss"), step_records(reference, "loss"), range(1, STEPS + 1)) <= 1e-5
    # evaluation shards the validation windows the same way
    assert abs(step_records(pair, "val_loss")[STEPS] - step_records(reference, "val_loss")[STEPS]) <= 1e-5
    assert json.loads((pair / "ds_config.json").read_text())["sequence_parallel_size"] == 2
    assert json.loads((pair / "checkpoints" / "step_00000010" / "meta.json").read_text())["sequence_parallel_size"] == 2


def test_sequence_parallel_checkpoint_resumes_on_one_process(config, pair, reference, workdir):
    run_dir = workdir / "sp2-to-1"
    out = run_ok(single(config, run_dir, *SHORT, f"train.resume={pair / 'checkpoints' / 'step_00000005'}",
                        "deepspeed.zero_stage=1"))
    assert "(step 5)" in out
    losses = step_records(run_dir, "loss")
    assert sorted(losses) == list(range(6, STEPS + 1))
    assert max_diff(losses, step_records(reference, "loss"), range(6, STEPS + 1)) <= 1e-5


def test_one_process_checkpoint_resumes_with_two_ranks_per_sequence(config, reference, workdir):
    run_dir = workdir / "sp1-to-2"
    out = run_ok(launcher(2, config, run_dir, *SHORT, f"train.resume={reference / 'checkpoints' / 'step_00000005'}",
                          "deepspeed.sequence_parallel_size=2", "deepspeed.zero_stage=1"))
    assert "(step 5)" in out
    losses = step_records(run_dir, "loss")
    assert sorted(losses) == list(range(6, STEPS + 1))
    assert max_diff(losses, step_records(reference, "loss"), range(6, STEPS + 1)) <= 1e-5


def test_two_sequence_parallel_pairs_with_zero2_train_like_one_process(config, reference, workdir):
    # 4 ranks = 2 data-parallel replicas x 2 ranks per sequence, micro-batch 1: the same global batch of 2.
    # Feed-forward chunks of 16 positions: ZeRO-2 reduces each gradient once, after a layer's last chunk
    run_dir = workdir / "sp2-dp2"
    out = run_ok(launcher(4, config, run_dir, *SHORT, "deepspeed.sequence_parallel_size=2", "deepspeed.zero_stage=2",
                          "train.micro_batch_size=1", "model.ff_chunk_size=16"))
    assert "2 data-parallel x 2 sequence-parallel (groups [0, 1], [2, 3])" in out
    assert max_diff(step_records(run_dir, "loss"), step_records(reference, "loss"), range(1, STEPS + 1)) <= 1e-5


@pytest.mark.parametrize(("overrides", "world_size", "key"), [
    (["model.n_heads=2", "deepspeed.sequence_parallel_size=4"], 4, "model.n_heads"),
    (["model.n_heads=3", "deepspeed.sequence_parallel_size=3"], 3, "train.seq_len"),  # 512 positions in 3 shards
    (["deepspeed.sequence_parallel_size=2"], 3, "deepspeed.sequence_parallel_size"),
    (["deepspeed.sequence_parallel_size=0"], 1, "deepspeed.sequence_parallel_size"),
])
def test_layouts_that_cannot_split_are_refused_naming_the_key(overrides, world_size, key):
    with pytest.raises(ConfigError) as err:
        build_deepspeed_config(load_config(["tiny"], overrides), world_size)
    assert err.value.key == key


def test_config_command_prints_the_layout_beside_the_deepspeed_json():
    proc = subprocess.run([sys.executable, "-m", "reformer_dist", "config", "--config", "tiny", "--deepspeed",
                           "--world-size", "8", "deepspeed.sequence_parallel_size=2", "train.micro_batch_size=8"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ds = json.loads(proc.stdout)
    assert ds["train_batch_size"] == 8 * 4 and ds["sequence_parallel_size"] == 2  # micro 8 x 4 replicas
    assert "8 ranks = 4 data-parallel x 2 sequence-parallel" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "reformer_dist", "config", "--config", "tiny", "--deepspeed",
                          "--world-size", "3", "deepspeed.sequence_parallel_size=2"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "deepspeed.sequence_parallel_size" in bad.stderr.strip().splitlines()[-1]

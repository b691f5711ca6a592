"""Multi-rank training through the real `deepspeed` launcher on CPU (gloo): ZeRO equivalence, gradient
accumulation, exact resume (SIGTERM, kill -9 mid-checkpoint, 2 -> 1 ranks), two launcher "nodes", a
killed rank, W&B offline records, no shared memory left in /dev/shm, a stale JIT build lock.

Every run trains the same micro Reformer (d_model 32, 2 reversible layers: local + LSH attention with fresh
random rotations per call, seq 64) on a small synthetic corpus for 20 steps, global batch 2, and logs the
loss of every step to metrics.jsonl. Runs are compared step by step. The first launch on a new machine
JIT-builds DeepSpeed's CPU communication op (about a minute, cached afterwards).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from launch_ports import free_port, segments_of
from micro_run import MICRO_MODEL
from wandb_records import history_rows, read_records

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
STEPS = 20
MICRO_CONFIG = MICRO_MODEL + """train:
  max_steps: 20
  seq_len: 64
  micro_batch_size: 2
  lr: 3.0e-3
  warmup_steps: 5
  eval_every: 10
  eval_batches: 2
  save_every: 10
  log_every: 1
"""
# ranks use one thread each: 2 ranks x N threads on a 2-core runner only adds contention; the launch/
# scripts find `deepspeed` and `python` on PATH, as in an activated virtual environment
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def train_args(config: Path, run_dir: Path, overrides: tuple[str, ...]) -> list[str]:
    return ["--module", "reformer_dist", "train", "--config", str(config), f"train.output_dir={run_dir}", *overrides]


def launcher(ranks: int, config: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`deepspeed --num_gpus N --module reformer_dist train ...` (on CPU: N gloo ranks)."""
    return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()),
            *train_args(config, run_dir, overrides)]


def port_of(cmd: list[str]) -> int:
    return int(cmd[cmd.index("--master_port") + 1])


def single(config: Path, run_dir: Path, *overrides: str) -> list[str]:
    """One process without a launcher: a world of one."""
    return [sys.executable, "-m", "reformer_dist", *train_args(config, run_dir, overrides)[2:]]


def run_ok(cmd: list[str], timeout: float = 300, env: dict[str, str] = ENV) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


class Job:
    """A background job in its own process group (so the whole job can be signalled), output in a file."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] = ENV):
        self.log = log
        with open(log, "w") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def rank_pids(self) -> dict[int, int]:
        """rank -> pid of the training processes the launcher started (read from their environment)."""
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "reformer_dist" in child.cmdline() and "RANK" in (env := child.environ()):
                    out[int(env["RANK"])] = child.pid
            except psutil.NoSuchProcess:
                continue
        return out


def step_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (a resumed run appends: the last record of a step wins)."""
    out: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict[int, float], b: dict[int, float], steps: range) -> float:
    missing = sorted(set(steps) - (set(a) & set(b)))
    assert not missing, f"steps without a loss: {missing}"
    return max(abs(a[s] - b[s]) for s in steps)


def latest(run_dir: Path) -> str:
    return (run_dir / "latest").read_text().strip()


def wait_for(predicate, timeout: float, what: str, job: Job | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job is not None and job.proc.poll() is not None:
            raise AssertionError(f"job exited ({job.proc.returncode}) while waiting for {what}:\n{job.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def plant_fifo(run_dir: Path, step: int) -> Path:
    """Make rank 0's write of checkpoint ``step`` block on a named pipe the test reads (a deterministic
    "mid-write" moment). The directory is created after training started: a launch discards incomplete
    checkpoint directories only at startup."""
    tag_dir = run_dir / "checkpoints" / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    fifo = tag_dir / "mp_rank_00_model_states.pt"
    os.mkfifo(fifo)
    return fifo


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def config(workdir: Path) -> Path:
    """The micro config plus a prepared byte-level corpus (deterministic synthetic text, ~60 KB)."""
    from reformer_dist.data import prepare_corpus

    words = ["the", "reformer", "hashes", "queries", "into", "buckets", "and", "attends", "within", "chunks",
             "reversible", "layers", "recompute", "activations", "while", "deepspeed", "shards", "states"]
    rng = np.random.default_rng(0)
    corpus = workdir / "corpus"
    corpus.mkdir()
    for i in range(4):
        lines = (" ".join(rng.choice(words, size=12)) + ".\n" for _ in range(250))
        (corpus / f"part{i}.txt").write_text("".join(lines))
    prepare_corpus([str(corpus)], str(workdir / "data"), val_fraction=0.1)
    path = workdir / "micro.yaml"
    path.write_text(MICRO_CONFIG + f"data:\n  path: {workdir / 'data'}\n")
    # ZeRO-3 keeps parameters below this many elements whole on every rank: 0 partitions all of them
    (workdir / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return path


@pytest.fixture(scope="module")
def reference(config: Path, workdir: Path) -> dict[int, float]:
    """One process, micro-batch 2: the losses every 2-rank run must reproduce."""
    run_ok(single(config, workdir / "ref"))
    losses = step_losses(workdir / "ref")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.fixture(scope="module")
def zero_run(config: Path, workdir: Path):
    """2 ranks x micro-batch 1 at ZeRO stage s (cached per stage), started with launch/train_single_node.sh."""
    done: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in done:
            run_dir, port = workdir / f"zero{stage}", free_port()
            run_ok(["bash", str(REPO / "launch" / "train_single_node.sh"), str(config), f"train.output_dir={run_dir}",
                    "train.micro_batch_size=1", f"deepspeed.zero_stage={stage}", "train.sample_every=10",
                    f"deepspeed.config_file={workdir / 'zero3.json'}"],
                   env={**ENV, "NUM_GPUS": "2", "MASTER_PORT": str(port)})
            assert not segments_of([port])  # DeepSpeed's per-rank shared memory went with the ranks
            done[stage] = run_dir
        return done[stage]

    return run


# --------------------------------------------------------------------------------------------- tests
def native_weights(run_dir: Path) -> dict:
    """The consolidated model written at the end of training, read back by the model package alone."""
    from reformer_dist.artifacts.native import from_native

    return from_native(run_dir / "native").state_dict()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_two_ranks_match_one_process_at_zero_stage(stage, zero_run, reference, workdir):
    run_dir = zero_run(stage)  # samples at steps 10 and 20 (the reference takes none): they change nothing
    assert max_diff(step_losses(run_dir), reference, range(1, STEPS + 1)) <= 1e-5
    assert [r["step"] for r in metrics(run_dir) if "sample" in r] == [10, 20]
    # the consolidated fp32 weights (gathered from 2 ranks' partitions) are the single process's weights
    ours, ref = native_weights(run_dir), native_weights(workdir / "ref")
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) <= 1e-4


def test_two_launcher_nodes_with_hostfile_train_zero1_like_one_process(config, workdir, reference):
    # two "nodes" on loopback addresses, one rank each, each started by its own launcher without ssh
    # (launch/train_multi_node.sh with NODE_RANK), rendezvous on the first
    hostfile = workdir / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    port, run_dir = free_port(), workdir / "two-nodes"
    jobs = [Job(["bash", str(REPO / "launch" / "train_multi_node.sh"), str(config), f"train.output_dir={run_dir}",
                 "train.micro_batch_size=1", "deepspeed.zero_stage=1"], workdir / f"node{node}.log",
                env={**ENV, "HOSTFILE": str(hostfile), "NODE_RANK": str(node), "MASTER_PORT": str(port)})
            for node in (0, 1)]
    for job in jobs:
        assert job.wait(timeout=300) == 0, job.output()
    assert max_diff(step_losses(run_dir), reference, range(1, STEPS + 1)) <= 1e-5


def test_grad_accum_2_x_micro_1_equals_micro_2(config, workdir):
    # LSH draws fresh rotations per forward call, so two micro-batches hash differently from one batch of
    # two: fix the rotations (model.hash_seed) to compare the accumulation arithmetic itself
    run_ok(single(config, workdir / "batch2", "model.hash_seed=7"))
    run_ok(single(config, workdir / "accum2", "model.hash_seed=7", "train.micro_batch_size=1", "train.grad_accum=2"))
    assert max_diff(step_losses(workdir / "accum2"), step_losses(workdir / "batch2"), range(1, STEPS + 1)) <= 1e-5


def test_zero2_checkpoint_of_two_ranks_resumes_on_one_rank(config, workdir, zero_run, reference):
    source = zero_run(2) / "checkpoints" / "step_00000010"
    run_dir = workdir / "two-to-one"
    out = run_ok(single(config, run_dir, f"train.resume={source}", "deepspeed.zero_stage=2"))
    assert "resuming from" in out and "(step 10)" in out
    # same weights, optimizer moments, LR schedule and data position: the rest of the run is unchanged
    assert sorted(step_losses(run_dir)) == list(range(11, STEPS + 1))
    assert max_diff(step_losses(run_dir), reference, range(11, STEPS + 1)) <= 1e-5
    assert not (run_dir / "universal").exists()  # the conversion is dropped once a checkpoint of our own exists


def test_sigterm_and_kill_during_checkpoint_resume_exactly_with_one_wandb_run(config, workdir, zero_run):
    straight = step_losses(zero_run(2))  # 20 uninterrupted steps, same config
    run_dir = workdir / "interrupted"
    args = ("train.micro_batch_size=1", "deepspeed.zero_stage=2", f"deepspeed.config_file={workdir / 'zero3.json'}",
            "logging.wandb.mode=offline")

    # 1) SIGTERM reaches rank 1 while rank 0 is writing checkpoint 10: all ranks stop after step 11, exit 0
    job = Job(cmd := launcher(2, config, run_dir, *args), workdir / "sigterm.log")
    wait_for(lambda: 1 in step_losses(run_dir), 300, "step 1", job)
    fifo = plant_fifo(run_dir, 10)
    with open(fifo, "rb") as pipe:  # blocks until rank 0 opens the pipe to write checkpoint 10
        pipe.read(1024)
        os.kill(job.rank_pids()[1], signal.SIGTERM)
        while pipe.read(1 << 16):  # let the write finish
            pass
    assert job.wait(timeout=120) == 0, job.output()
    assert latest(run_dir) == "step_00000011"
    assert "stop signal received by a peer rank: checkpoint saved at step 11" in job.output()
    assert not segments_of([port_of(cmd)])

    # 2) resume; kill -9 the whole job while rank 0 writes the final checkpoint: `latest` stays on 11
    job = Job(cmd := launcher(2, config, run_dir, *args), workdir / "kill.log")
    wait_for(lambda: 12 in step_losses(run_dir), 300, "step 12", job)
    fifo = plant_fifo(run_dir, 20)
    with open(fifo, "rb") as pipe:
        pipe.read(1024)  # rank 0 is mid-write
        os.killpg(job.proc.pid, signal.SIGKILL)
    job.wait(timeout=60)
    assert not segments_of([port_of(cmd)])  # the segments' names were released once both ranks had mapped them
    assert latest(run_dir) == "step_00000011"
    assert not (run_dir / "checkpoints" / "step_00000020" / "meta.json").exists()
    killed = step_losses(run_dir)

    # 3) resume again: the incomplete checkpoint is discarded, the previous one loads, training finishes.
    # Segments of a job killed during its setup (before they were released) are removed, with one line
    orphans = [Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{free_port()}_{rank}"
               for rank in (0, 1)]
    for orphan in orphans:
        orphan.write_bytes(b"\0" * 4096)
        os.utime(orphan, (time.time() - 60,) * 2)
    out = run_ok(launcher(2, config, run_dir, *args))
    assert not any(orphan.exists() for orphan in orphans)
    lines = [line for line in out.splitlines() if "orphaned DeepSpeed shared-memory segment" in line]
    assert len(lines) == 1 and all(orphan.name in lines[0] for orphan in orphans), out[-3000:]
    assert latest(run_dir) == "step_00000020"
    resumed = step_losses(run_dir)
    assert max_diff(killed, straight, range(1, STEPS + 1)) <= 1e-6  # steps 12-20 of the killed launch
    assert max_diff(resumed, straight, range(1, STEPS + 1)) <= 1e-6

    # W&B (offline): the three launches wrote one run id, and its records hold the logged metrics
    run_id = (run_dir / "wandb_id").read_text().strip()
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 3 and all(f.name == f"run-{run_id}.wandb" for f in files)
    rows = [row for f in files for row in history_rows(read_records(f))]
    logged = {int(row["_step"]): row for row in rows if "loss" in row}
    assert set(logged) == set(range(1, STEPS + 1))
    assert all(row["tokens_per_s"] > 0 for row in logged.values())
    assert abs(logged[STEPS]["loss"] - straight[STEPS]) <= 1e-6
    records = read_records(files[-1])
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "run" for item in r.run.config.update}
    assert {"model", "train", "deepspeed", "ds_config"} <= config_keys
    assert any(r.WhichOneof("record_type") == "stats" for f in files for r in read_records(f))


def test_killed_rank_makes_the_other_exit_nonzero_within_timeout(config, workdir):
    # two ranks started directly, as `srun` starts them (launch/slurm_task.sh with SLURM's task variables):
    # no launcher cleans up, the survivor must notice the dead peer in a collective and fail by itself
    run_dir, port = workdir / "dead-rank", free_port()
    cmd = ["bash", str(REPO / "launch" / "slurm_task.sh"), "--config", str(config), f"train.output_dir={run_dir}",
           "train.max_steps=100000", "train.micro_batch_size=1", "train.eval_every=0", "train.save_every=0"]
    jobs = [Job(cmd, workdir / f"dead{rank}.log", env={**ENV, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                                                        "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1",
                                                        "MASTER_PORT": str(port)})
            for rank in (0, 1)]
    try:
        wait_for(lambda: 3 in step_losses(run_dir), 300, "step 3", jobs[0])
        jobs[1].proc.kill()
        t0 = time.monotonic()
        code = jobs[0].wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for job in jobs:
            job.proc.kill()
    assert code != 0 and elapsed < 120, jobs[0].output()


@pytest.mark.parametrize("stage", [0, 2])  # 0: reformer-dist's guarded AdamW; 2: DeepSpeed's ZeRO overflow check
def test_diverged_run_skips_non_finite_steps_then_stops_with_the_last_good_checkpoint(stage, config, workdir):
    # lr 1e30: the first update (finite gradients) throws the weights to ~1e30, every later loss is NaN
    run_dir = workdir / f"diverged{stage}"
    proc = subprocess.run(single(config, run_dir, "train.lr=1e30", "train.warmup_steps=0", "train.save_every=1",
                                 "train.max_nonfinite_steps=3", f"deepspeed.zero_stage={stage}"),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped at step 4: 3 steps in a row had a non-finite loss or gradients" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert latest(run_dir) == "step_00000001"  # no checkpoint was written during the skipped steps
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records if "loss" in r] == [0, 1, 2, 3]


def test_samples_print_at_their_steps_and_go_to_wandb_as_a_text_table(config, workdir):
    import torch

    from reformer_dist.artifacts.model_source import load_model
    from reformer_dist.data.tokenizer import get_tokenizer
    from reformer_dist.decoding import generate
    from reformer_dist.train.evaluate import SAMPLE_TEMPERATURE, SAMPLE_TOP_K

    run_dir = workdir / "sampled"
    out = run_ok(single(config, run_dir, "train.max_steps=4", "train.eval_every=2", "train.save_every=0",
                        "train.sample_every=2", "train.sample_prompt=the", "train.sample_tokens=30",
                        "logging.wandb.mode=offline"))
    samples = {r["step"]: r["sample"] for r in metrics(run_dir) if "sample" in r}
    assert sorted(samples) == [2, 4]
    for step, text in samples.items():
        assert text.startswith("the") and len(text) > 3
        assert f"sample step {step} |\n{text}\n" in out
    assert [r["step"] for r in metrics(run_dir) if "val_loss" in r] == [0, 2, 4]  # step 0: the untrained model

    # the last sample is the decoding runtime's continuation by the final weights, seeded by train.seed
    source = load_model(run_dir / "native")
    tokenizer = get_tokenizer(source.tokenizer)
    new = generate(source.model, torch.tensor([tokenizer.encode("the")]), 30, temperature=SAMPLE_TEMPERATURE,
                   top_k=SAMPLE_TOP_K, seed=1234)
    assert samples[4] == "the" + tokenizer.decode(new[0].tolist())

    # W&B: the `samples` table logged at each sample step holds every sample so far, as text
    files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    tables = {int(row["_step"]): row for row in history_rows(read_records(files[0])) if "samples/path" in row}
    assert sorted(tables) == [2, 4]
    assert tables[4]["samples/_type"] == "table-file"
    table = json.loads(next(run_dir.glob("wandb/offline-run-*/files")).joinpath(tables[4]["samples/path"]).read_text())
    assert table["columns"] == ["step", "text"]
    assert table["data"] == [[2, samples[2]], [4, samples[4]]]


def test_stale_jit_build_lock_fails_the_launch_naming_the_file_and_the_fix(config, workdir):
    # a build of DeepSpeed's CPU comm op killed mid-way leaves its lock, which torch would wait on forever
    extensions = workdir / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 60,) * 2)
    proc = subprocess.run(single(config, workdir / "stale-lock"), env={**ENV, "TORCH_EXTENSIONS_DIR": str(extensions)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("reformer-dist train: error:")]
    assert len(errors) == 1 and str(lock) in errors[0] and f"rm {lock}" in errors[0], proc.stderr[-3000:]

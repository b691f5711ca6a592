"""Memory planner vs measured peaks: `reformer-dist plan`'s prediction next to the peak RSS of real training runs.

Each (config, length, ranks) trains 2 steps with `deepspeed --num_gpus R --module reformer_dist train` on a
synthetic byte corpus (ZeRO-1, fp32, micro-batch 1; 2 ranks share each sequence: sequence_parallel_size=2)
and reads every rank's peak RSS from metrics.jsonl (logged after each step, before the final checkpoint).
Configs: `tiny` (configs/tiny.yaml: local + LSH, d_model 128, dropout 0.05) and `bench`
(benchmarks/train_step_impls.py's size: 6 LSH layers, d_model 256, 4 heads, d_ff 1024, dropout 0).

    python benchmarks/bench_memory_plan.py                                  # 16K, 64K, 256K x 1, 2 ranks
    python benchmarks/bench_memory_plan.py --lengths 16384 --configs bench --ranks 1
    python benchmarks/bench_memory_plan.py --lengths 16384,65536 --mmap-threshold 65536 --tag memory_plan_live

Writes benchmarks/results/<tag>.{md,json} (default memory_plan), after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_MODEL = """model:
  vocab_size: 256
  d_model: 256
  n_heads: 4
  d_head: 64
  d_ff: 1024
  n_layers: 6
  attn_layers: [lsh]
  lsh_window: bucket
  lsh_chunk_len: 64
  lsh_n_hashes: 2
  dropout: 0.0
  attn_dropout: 0.0
  axial_pos_dims: [128, 128]
  ff_chunk_size: 1024
  loss_chunk_size: 1024
"""


def corpus(workdir: Path, n_bytes: int) -> Path:
    """A prepared byte corpus of random printable text with at least ``n_bytes`` training tokens."""
    import numpy as np

    from reformer_dist.data import prepare_corpus

    text = workdir / "text"
    text.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    (text / "random.txt").write_bytes(rng.integers(32, 127, size=n_bytes, dtype=np.uint8).tobytes())
    prepare_corpus([str(text)], str(workdir / "data"), val_fraction=0.001)  # too short to evaluate on
    return workdir / "data"


def run_args(config: str, length: int, ranks: int, data: Path, run_dir: Path) -> tuple[list[str], list[str]]:
    """(--config files, overrides) of one measurement."""
    files = [str(REPO / "configs" / "tiny.yaml")] if config == "tiny" else []
    if config == "bench":
        path = run_dir.parent / "bench.yaml"
        path.write_text(BENCH_MODEL)
        files = [str(path)]
    axial = [max(1, length // 64), 64] if config == "bench" else [max(1, length // 32), 32]
    overrides = [f"data.path={data}", f"train.output_dir={run_dir}", f"train.seq_len={length}",
                 f"model.max_seq_len={length}", f"model.axial_pos_shape=[{axial[0]},{axial[1]}]",
                 "train.micro_batch_size=1", "train.grad_accum=1", "train.max_steps=2", "train.log_every=1",
                 "train.eval_every=0", "train.save_every=0", "train.warmup_steps=1", "deepspeed.zero_stage=1",
                 "deepspeed.precision=fp32", f"deepspeed.sequence_parallel_size={ranks}"]
    return files, overrides


def measure(config: str, length: int, ranks: int, data: Path, workdir: Path, threads: int,
            mmap_threshold: int = 0) -> dict:
    from reformer_dist.run_config import load_config
    from reformer_dist.train.memory_plan import plan_memory

    run_dir = workdir / f"{config}-{length}-{ranks}"
    files, overrides = run_args(config, length, ranks, data, run_dir)
    predicted = plan_memory(load_config(files, overrides), ranks, "cpu")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(29500 + (os.getpid() % 400)), "--module", "reformer_dist", "train",
           *[a for f in files for a in ("--config", f)], *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if mmap_threshold:  # freed blocks above it go back to the OS at once: peak RSS ~ live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    steps = [r for r in records if "memory_gib" in r]
    if proc.returncode != 0 or not steps:
        return {"config": config, "length": length, "ranks": ranks, "error": (proc.stderr or proc.stdout)[-600:]}
    measured = max(steps[-1]["memory_gib"])
    return {"config": config, "length": length, "ranks": ranks, "measured_gib": measured,
            "predicted_gib": predicted.peak_bytes / 2**30, "peak_moment": predicted.peak_moment,
            "error_pct": 100 * (predicted.peak_bytes / 2**30 - measured) / measured}


def sweep(points: list[tuple], measure: Callable[..., dict], threads: int,
          write: Callable[[list[dict]], None]) -> list[dict]:
    """``measure(*point, data, workdir, threads)`` for every point (its second entry is the length), on one
    synthetic corpus long enough for two windows of the longest; each result is printed as it comes and the
    results so far are written (``write``), so that a sweep stopped early keeps what it measured."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = corpus(workdir, 2 * max(p[1] for p in points) + 4096)
        for point in points:
            results.append(measure(*point, data, workdir, threads))
            print(json.dumps(results[-1]), flush=True)
            write(results)
    return results


def table(results: list[dict]) -> str:
    rows = ["| config | length | ranks (P) | measured peak / rank | predicted | error | predicted peak moment |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | {r['length']:,} | {r['ranks']} | failed | | | {r['error'][-80:]!r} |")
        else:
            rows.append(f"| {r['config']} | {r['length']:,} | {r['ranks']} | {r['measured_gib']:.3f} GiB | "
                        f"{r['predicted_gib']:.3f} GiB | {r['error_pct']:+.1f}% | {r['peak_moment']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,bench")
    parser.add_argument("--lengths", default="16384,65536,262144")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="memory_plan", help="file name stem of the outputs")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="pin glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the ranks, so freed blocks above it leave "
                             "the heap at once and peak RSS ~ live memory (what the planner counts); 0 = glibc's "
                             "default (a dynamic threshold up to 32 MiB, below which freed memory stays resident)")
    args = parser.parse_args()
    points = [(config, int(length), int(ranks)) for config in args.configs.split(",")
              for length in args.lengths.split(",") for ranks in args.ranks.split(",")]
    command = "python benchmarks/bench_memory_plan.py " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict]) -> None:
        load = os.getloadavg()
        pinned = (f" Ranks ran with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}: glibc returns freed blocks above it "
                  f"at once, so the peak RSS is live memory, what the planner counts." if args.mmap_threshold else "")
        (args.out / f"{args.tag}.md").write_text(f"Command: `{command}` (load average {load[0]:.1f} after the last "
                                                 f"run; memory peaks do not depend on load).{pinned}\n\n"
                                                 f"{table(results)}\n")
        (args.out / f"{args.tag}.json").write_text(json.dumps({"command": command, "results": results}, indent=1))

    print("\n" + table(sweep(points, partial(measure, mmap_threshold=args.mmap_threshold), args.threads, write)))


if __name__ == "__main__":
    main()

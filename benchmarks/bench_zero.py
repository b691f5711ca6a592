"""ZeRO benchmark: tokens/s and peak memory per rank of `reformer-dist train` at ZeRO 0-3 and with CPU offload.

Every (model, mode) cell is a real training run through the DeepSpeed launcher on ``--ranks`` ranks (gloo
on a CPU-only machine): ``--steps`` steps, no evaluation, one thread per rank. Tokens/s is the median of the
per-step readouts after ``--warmup`` steps (the run's own metrics.jsonl: global tokens over wall time of the
step, all ranks together); memory is each rank's peak (resident set size on CPU, allocated CUDA memory on
GPU) at the last step, which on CPU includes the ~0.4 GiB of the imported libraries.

    python benchmarks/bench_zero.py                                   # tiny and base, all modes, 2 ranks
    python benchmarks/bench_zero.py --models tiny --steps 20 --out benchmarks/results/bench_zero.md

Models: the ``tiny`` config as is; ``base`` at ``--base-seq-len`` tokens per sample (its 16K samples take
minutes per step on a CPU). Data: ``--data`` (default runs/data/stdlib, prepared from the Python standard
library when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES: dict[str, list[str]] = {
    "ZeRO-0": ["deepspeed.zero_stage=0"],
    "ZeRO-1": ["deepspeed.zero_stage=1"],
    "ZeRO-2": ["deepspeed.zero_stage=2"],
    "ZeRO-3": ["deepspeed.zero_stage=3"],
    "ZeRO-2 + offload opt": ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"],
    "ZeRO-3 + offload opt+params": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                                    "deepspeed.offload_params=true"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(model: str, extra: list[str], mode: list[str], ranks: int, steps: int, warmup: int, data: str,
             timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
               str(free_port()), "--module", "reformer_dist", "train", "--config", model, f"data.path={data}",
               f"train.output_dir={run_dir}", f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0",
               "train.save_every=0", "logging.wandb.mode=disabled", *extra, *mode]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
            return {"error": f"exit {proc.returncode}: {tail[0][:120] if tail else ''}"}
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "tokens_per_s" in r]
        timed = train[warmup:] or train
        return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                "memory_gib": train[-1]["memory_gib"], "steps": len(train), "wall_s": wall}


def ensure_data(path: str) -> None:
    if not (Path(path) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "reformer_dist", "prepare-data", "--input", "stdlib", "--output", path],
                       check=True, cwd=REPO)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), metavar="MODE")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="training steps per run (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from tokens/s (default 2)")
    parser.add_argument("--base-seq-len", type=int, default=2048)
    parser.add_argument("--data", default=str(REPO / "runs" / "data" / "stdlib"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    args = parser.parse_args()

    ensure_data(args.data)
    extras = {"tiny": [], "base": [f"train.seq_len={args.base_seq_len}", "train.micro_batch_size=1",
                                   "train.grad_accum=1"]}
    load_before = os.getloadavg()[0]
    rows = []
    for model in args.models:
        for name in args.modes:
            cell = run_cell(model, extras[model], MODES[name], args.ranks, args.steps, args.warmup, args.data,
                            args.timeout)
            rows.append((model, name, cell))
            print(model, name, json.dumps(cell), file=sys.stderr, flush=True)
    header = (f"# bench_zero: {args.ranks} ranks, {args.steps} steps (median tokens/s after {args.warmup}), "
              f"one thread per rank, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}\n\n"
              "| model | mode | tokens/s (all ranks) | peak memory per rank (GiB) | run wall time (s) |\n"
              "|---|---|---:|---|---:|\n")
    lines = []
    for model, name, cell in rows:
        if "error" in cell:
            lines.append(f"| {model} | {name} | failed: {cell['error']} | | |")
        else:
            memory = " / ".join(f"{m:.2f}" for m in cell["memory_gib"])
            lines.append(f"| {model} | {name} | {cell['tokens_per_s']:,.0f} | {memory} | {cell['wall_s']:.0f} |")
    table = header + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()

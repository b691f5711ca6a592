"""Sequence parallelism on CPU: per-rank peak memory and step time with P = 1 and 2 ranks per sequence.

Each (length, P) trains with `deepspeed --num_gpus P --module reformer_dist train ... deepspeed.sequence_parallel_size=P`
(ZeRO-1, fp32, micro-batch 1, benchmarks/train_step_impls.py's model: 6 LSH layers, d_model 256, 4 heads,
d_ff 1024) on a synthetic byte corpus, and reads every rank's peak RSS and the step time from metrics.jsonl
(the last logged step: 2 steps below 1M tokens, 1 step from 1M on). `reformer-dist plan`'s prediction is
printed beside each measurement. A run is skipped, with the reason in the table, when the machine has less
available memory than its predicted total plus 1 GiB.

    python benchmarks/bench_sequence_parallel.py                                   # 64K, 256K, 1M x P = 1, 2
    python benchmarks/bench_sequence_parallel.py --lengths 262144 --ranks 1,2 --tag sp_256k
    python benchmarks/bench_sequence_parallel.py --lengths 1835008 --ranks 2 --tag sp_longest   # ~20 GiB total

Writes benchmarks/results/<tag>.{md,json,png} after every run (`--merge` keeps an earlier run's rows).
Step times on a shared machine are inflated: compare the rows of one run (the load average is recorded),
and re-run on an idle machine for absolute times.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from bench_memory_plan import run_args, sweep
from bench_train_step import finish_plot

HERE = Path(__file__).resolve().parent


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def measure(config: str, length: int, ranks: int, data: Path, workdir: Path, threads: int) -> dict:
    from reformer_dist.run_config import load_config
    from reformer_dist.train.memory_plan import plan_memory

    run_dir = workdir / f"sp-{length}-{ranks}"
    files, overrides = run_args(config, length, ranks, data, run_dir)
    steps = 2 if length < 2**20 else 1
    overrides = [o for o in overrides if not o.startswith("train.max_steps")] + [f"train.max_steps={steps}"]
    predicted = plan_memory(load_config(files, overrides), ranks, "cpu").peak_bytes / 2**30
    row = {"length": length, "ranks": ranks, "predicted_gib": predicted, "load_before": os.getloadavg()[0]}
    if available_gib() < ranks * predicted + 1:
        return {**row, "skipped": f"{available_gib():.1f} GiB available < {ranks * predicted + 1:.1f} GiB needed"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(29500 + (os.getpid() % 400)), "--module", "reformer_dist", "train",
           *[a for f in files for a in ("--config", f)], *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    logged = [r for r in records if "memory_gib" in r]
    if proc.returncode != 0 or not logged:
        return {**row, "error": (proc.stderr or proc.stdout)[-600:]}
    last = logged[-1]
    return {**row, "steps": steps, "step_s": length / last["tokens_per_s"], "peak_gib": last["memory_gib"],
            "wall_s": time.perf_counter() - start, "load_after": os.getloadavg()[0]}


def table(results: list[dict]) -> str:
    rows = ["| tokens | P | step time | peak RSS per rank | predicted (error) | load avg |", "|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['length']:,} | {r['ranks']} |"
        if "skipped" in r or "error" in r:
            rows.append(f"{head} {r.get('skipped') or 'failed: ' + repr(r['error'][-100:])} | | "
                        f"{r['predicted_gib']:.2f} GiB | {r['load_before']:.1f} |")
            continue
        peaks = " / ".join(f"{p:.2f}" for p in r["peak_gib"])
        error = 100 * (r["predicted_gib"] / max(r["peak_gib"]) - 1)
        rows.append(f"{head} {r['step_s']:.1f} s | {peaks} GiB | {r['predicted_gib']:.2f} GiB ({error:+.0f}%) | "
                    f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    by = {(r["length"], r["ranks"]): r for r in results if "peak_gib" in r}
    notes = []
    lengths = sorted({r["length"] for r in results})
    for length in lengths:
        one, two = by.get((length, 1)), by.get((length, 2))
        if one and two:
            notes.append(f"- {length:,} tokens: P=2 / P=1 per-rank peak {max(two['peak_gib']) / max(one['peak_gib']):.2f}x, "
                         f"step time {two['step_s'] / one['step_s']:.2f}x")
    # growth with the length at a fixed P (linear scaling: 4x the tokens should cost ~4x the time)
    for ranks in sorted({r["ranks"] for r in results}):
        measured = [n for n in lengths if (n, ranks) in by]
        pairs = list(itertools.pairwise(measured))
        if 65536 in measured and 1048576 in measured:
            pairs.append((65536, 1048576))
        for a, b in pairs:
            ra, rb = by[(a, ranks)], by[(b, ranks)]
            notes.append(f"- P={ranks}: {b:,} / {a:,} tokens ({b // a}x): step time {rb['step_s'] / ra['step_s']:.2f}x, "
                         f"per-rank peak {max(rb['peak_gib']) / max(ra['peak_gib']):.2f}x")
    return "\n".join([*rows, "", *notes])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ranks in sorted({r["ranks"] for r in results}):
        pts = sorted((r["length"], r["step_s"], max(r["peak_gib"]), r["predicted_gib"]) for r in results
                     if r["ranks"] == ranks and "peak_gib" in r)
        if not pts:
            continue
        xs = [p[0] for p in pts]
        line = ax_t.plot(xs, [p[1] for p in pts], "o-", label=f"P={ranks}")[0]
        ax_m.plot(xs, [p[2] for p in pts], "o-", color=line.get_color(), label=f"P={ranks} measured")
        ax_m.plot(xs, [p[3] for p in pts], "x--", color=line.get_color(), label=f"P={ranks} planner")
    finish_plot(fig, {ax_t: "step time (s)", ax_m: "peak RSS per rank (GiB)"},
                "Sequence parallelism on CPU: P ranks per sequence, 1 thread each, fp32, ZeRO-1", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="65536,262144,1048576")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (default 1: 2 ranks on 2 cores)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--tag", default="sequence_parallel")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="earlier runs' .json files: their rows are kept unless a later file or this run "
                             "re-measures them (with --lengths '' nothing is measured: the tables and plot are redrawn)")
    args = parser.parse_args()
    points = [("bench", int(length), int(ranks)) for length in args.lengths.split(",") if length
              for ranks in args.ranks.split(",")]
    commands, rows = [], {}
    for path in args.merge:
        earlier = json.loads(path.read_text())
        commands += earlier.get("commands", [earlier["command"]] if "command" in earlier else [])
        rows.update({(r["length"], r["ranks"]): r for r in earlier["results"]})
    if points:
        commands.append("python benchmarks/bench_sequence_parallel.py " + shlex.join(sys.argv[1:]))
    commands = list(dict.fromkeys(commands))
    fresh = {(length, ranks) for _, length, ranks in points}
    kept = [r for key, r in rows.items() if key not in fresh]
    args.out.mkdir(parents=True, exist_ok=True)

    def write(results: list[dict]) -> None:
        results = sorted([*kept, *results], key=lambda r: (r["length"], -r["ranks"]))
        listed = "\n".join(f"- `{c}`" for c in commands)
        (args.out / f"{args.tag}.md").write_text(f"Commands (later ones re-measure the rows they cover):\n{listed}\n\n"
                                                 f"{table(results)}\n")
        (args.out / f"{args.tag}.json").write_text(json.dumps({"commands": commands, "results": results}, indent=1))
        plot(results, args.out / f"{args.tag}.png")

    results = sweep(points, measure, args.threads, write) if points else []
    write(results)
    print((args.out / f"{args.tag}.md").read_text())


if __name__ == "__main__":
    main()

"""Training-step benchmark: this Reformer vs HF transformers, lucidrains' reformer-pytorch and plain SDPA.

Each (implementation, length) runs in a fresh process: build the model (seeded), one warm-up step, then
``--steps`` timed forward+backward steps at batch 1, fp32, 2 threads, with glibc's default allocator
settings (as the anchor figures were taken) unless ``--thp`` puts every implementation's large
host allocations on transparent huge pages (torch's ``THP_MEM_ALLOC_ENABLE``, what ``reformer-dist train``
sets). The parent records the median step time, the child's peak RSS, minor page faults and CPU time
(``wait4``'s rusage) and each step's CPU time, prints a markdown table with the ratios to HF, and writes the table (.md), the raw
numbers (.json) and a log-log plot (.png) to ``--out``.

    pip install -e ".[bench]"                                   # HF 4.57.6, reformer-pytorch, matplotlib
    python benchmarks/bench_train_step.py                       # 1K..64K all four, then ours at 256K, 1M
    python benchmarks/bench_train_step.py --lengths 1024,4096 --impls ours,hf --ours-lengths ''
    python benchmarks/bench_train_step.py --impls ours --lengths 16384,65536 --ours-lengths 1048576 --threads 1 \
        --thp --tag train_step_1m        # linear scaling of ours in one process (CPU-time ratios)
    python benchmarks/bench_train_step.py --impls ours --lengths 16384,65536 --ours-lengths 1048576 --threads 1 \
        --thp --keep-freed-memory --tag train_step_1m_keep_freed   # the same with glibc keeping freed memory
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMPLS = ("ours", "hf", "lucidrains", "sdpa")


def child(impl: str, length: int, steps: int, threads: int, warmup: int) -> None:
    """Run in the fresh process: print one JSON line with the step times."""
    import torch

    sys.path.insert(0, str(HERE))
    from train_step_impls import BUILDERS

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, step = BUILDERS[impl](length)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))
    times, cpu_times = [], []
    for i in range(steps + warmup):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(ids).backward()
        if i >= warmup:  # warm-up steps pay for lazy imports and first allocations
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        print(json.dumps({"partial": True, "times": times, "cpu_times": cpu_times}), flush=True)
    print(json.dumps({"times": times, "cpu_times": cpu_times}), flush=True)


def measure(impl: str, length: int, steps: int, threads: int, warmup: int, timeout: float,
            mmap_threshold: int = 0, thp: bool = False, keep_freed: bool = False) -> dict:
    """Run one child; return its times, peak RSS (its own ru_maxrss, via wait4) and status."""
    cmd = [sys.executable, __file__, "--child", impl, str(length), str(steps), str(threads), str(warmup)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    if keep_freed:  # every block from the heap, which is never trimmed: freed memory is reused, not re-faulted
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(1 << 40))
    env["THP_MEM_ALLOC_ENABLE"] = "1" if thp else "0"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, wait_status, usage = os.wait4(proc.pid, 0)  # reap it ourselves to get its rusage
        timer.cancel()
        code = os.waitstatus_to_exitcode(wait_status)
        proc.returncode = code
        out.seek(0)
        err.seek(0)
        lines = [json.loads(line) for line in out.read().splitlines() if line.startswith("{")]
        error = (err.read().strip().splitlines() or ["?"])[-1][:120]
    times = lines[-1]["times"] if lines else []
    cpu_times = lines[-1].get("cpu_times", []) if lines else []
    status = "ok" if code == 0 else ("timeout" if code == -signal.SIGKILL else f"error: {error}")
    return {"impl": impl, "length": length, "times": times, "median_s": statistics.median(times) if times else None,
            "cpu_median_s": statistics.median(cpu_times) if cpu_times else None,
            "peak_rss_gib": usage.ru_maxrss / 2**20, "minor_faults": usage.ru_minflt,
            "cpu_s": usage.ru_utime + usage.ru_stime, "load": os.getloadavg()[0], "thp": thp,
            "keep_freed": keep_freed, "status": status}


def fmt_cell(r: dict) -> str:
    if r["median_s"] is None:
        return f"{r['status']} (peak {r['peak_rss_gib']:.2f} GiB)"
    note = "" if r["status"] == "ok" else f" ({r['status']}, n={len(r['times'])})"
    cpu = f" (CPU {r['cpu_median_s']:.3g} s)" if r.get("cpu_median_s") else ""
    return f"{r['median_s']:.3g} s{cpu} / {r['peak_rss_gib']:.2f} GiB{note}"


def table(results: list[dict]) -> str:
    lengths = sorted({r["length"] for r in results})
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    get = {(r["impl"], r["length"]): r for r in results}
    head = "| impl | " + " | ".join(f"{n:,}" for n in lengths) + " |"
    rows = [head, "|" + "---|" * (len(lengths) + 1)]
    for impl in impls:
        rows.append(f"| {impl} | " + " | ".join(fmt_cell(get[(impl, n)]) if (impl, n) in get else "-"
                                                 for n in lengths) + " |")
    for impl in impls:
        if impl == "hf":
            continue
        cells = []
        for n in lengths:
            a, b = get.get((impl, n)), get.get(("hf", n))
            if a and b and a["median_s"] and b["median_s"]:
                cells.append(f"{a['median_s'] / b['median_s']:.2f}x / {a['peak_rss_gib'] / b['peak_rss_gib']:.2f}x")
            else:
                cells.append("-")
        if any(c != "-" for c in cells):
            rows.append(f"| {impl} / hf (time / mem) | " + " | ".join(cells) + " |")
    return "\n".join([*rows, "", *growth(results)])


def growth(results: list[dict]) -> list[str]:
    """How each implementation's step grows with the length: ratios of consecutive measured lengths (and of
    1M to 64K), in wall time, in CPU time (the process's own: robust to other jobs on a shared machine
    when the model runs on one thread) and in peak memory."""
    lines = []
    for impl in IMPLS:
        got = {r["length"]: r for r in results if r["impl"] == impl and r["median_s"]}
        lengths = sorted(got)
        pairs = list(itertools.pairwise(lengths))
        if 65536 in got and 1048576 in got and (65536, 1048576) not in pairs:
            pairs.append((65536, 1048576))
        for a, b in pairs:
            ra, rb = got[a], got[b]
            cpu = (f", CPU time {rb['cpu_median_s'] / ra['cpu_median_s']:.2f}x"
                   if ra.get("cpu_median_s") and rb.get("cpu_median_s") else "")
            lines.append(f"- {impl} {b:,} / {a:,} tokens ({b / a:g}x): wall time {rb['median_s'] / ra['median_s']:.2f}x"
                         f"{cpu}, peak RSS {rb['peak_rss_gib'] / ra['peak_rss_gib']:.2f}x")
    return lines


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in IMPLS:
        pts = sorted((r["length"], r["median_s"], r["peak_rss_gib"]) for r in results
                     if r["impl"] == impl and r["median_s"] is not None)
        if pts:
            xs = [p[0] for p in pts]
            ax_t.plot(xs, [p[1] for p in pts], "o-", label=impl)
            ax_m.plot(xs, [p[2] for p in pts], "o-", label=impl)
    finish_plot(fig, {ax_t: "median step time (s)", ax_m: "peak RSS (GiB)"},
                "Training step (fwd+bwd), batch 1, fp32, 2 CPU threads", path)


def finish_plot(fig, labels: dict, title: str, path: Path) -> None:
    """Log-log axes against the sequence length, with their y labels; title; saved to ``path``."""
    for ax, label in labels.items():
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=5, metavar=("IMPL", "LENGTH", "STEPS", "THREADS", "WARMUP"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    parser.add_argument("--lengths", default="1024,4096,16384,65536", help="lengths for every impl")
    parser.add_argument("--ours-lengths", default="262144,1048576", help="extra lengths for ours alone")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up (median reported)")
    parser.add_argument("--long-steps", type=int, default=1, help="timed steps at lengths >= 65536")
    parser.add_argument("--long-warmup", type=int, default=0, help="warm-up steps at lengths >= 65536 (else 1)")
    parser.add_argument("--mmap-threshold", type=int, default=0,
                        help="pin glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in every child, so freed large tensors go "
                             "back to the OS and peak RSS excludes heap fragmentation (costs page faults); 0 = default")
    parser.add_argument("--thp", action="store_true",
                        help="transparent huge pages for every implementation's allocations >= 2 MiB")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc serves every child's allocations from its heap and never trims it "
                             "(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=1 TiB): freed tensors are reused instead of "
                             "unmapped and faulted in again, at the price of resident memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per (impl, length) process")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for .md/.json/.png")
    parser.add_argument("--tag", default="train_step", help="file name stem of the outputs")
    parser.add_argument("--merge", type=Path, default=None,
                        help="an earlier run's .json: its cells are kept unless this run re-measures them "
                             "(the .md then lists both commands)")
    args = parser.parse_args()
    if args.child:
        impl, length, steps, threads, warmup = args.child
        child(impl, int(length), int(steps), int(threads), int(warmup))
        return
    plan = [(i, int(n)) for n in args.lengths.split(",") if n for i in args.impls.split(",") if i]
    plan += [("ours", int(n)) for n in args.ours_lengths.split(",") if n]
    results = []
    for impl, length in plan:
        steps = args.long_steps if length >= 65536 else args.steps
        warmup = args.long_warmup if length >= 65536 else 1
        r = measure(impl, length, steps, args.threads, warmup, args.timeout, args.mmap_threshold, args.thp,
                    args.keep_freed_memory)
        results.append(r)
        print(f"{impl:>10} {length:>8}: {fmt_cell(r)}", flush=True)
    cmd = "python benchmarks/bench_train_step.py " + shlex.join(sys.argv[1:])
    commands = [cmd]
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        fresh = {(r["impl"], r["length"]) for r in results}
        results = [r for r in earlier["results"] if (r["impl"], r["length"]) not in fresh] + results
        commands = [c for c in earlier["commands"] if c != cmd] + commands  # a re-run command moves last
    md = table(results)
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    listed = "\n".join(f"- `{c}`" for c in commands)
    (args.out / f"{args.tag}.md").write_text(f"Commands (later ones re-measure the cells they cover):\n{listed}\n\n{md}\n")
    (args.out / f"{args.tag}.json").write_text(json.dumps({"commands": commands, "results": results}, indent=1))
    plot(results, args.out / f"{args.tag}.png")
    print(f"\nwrote {args.out / (args.tag + '.md')}, .json and .png")


if __name__ == "__main__":
    main()

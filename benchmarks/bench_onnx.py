"""Inference latency: ONNX Runtime (CPU) vs PyTorch eager, batch 1, on the benchmark Reformer.

    .venv/bin/python benchmarks/bench_onnx.py                       # lengths 1024 4096 16384
    .venv/bin/python benchmarks/bench_onnx.py --lengths 1024 --repeats 3

Model: byte vocab 256, 6 layers all LSH (bucket window), d_model 256, 4 heads x 64, d_ff 1024, chunk 64,
2 hashes, causal, fp32, random weights (latency does not depend on them). The model is exported once per
LSH body (counting sort, TopK sort) and each graph is timed at every length; medians over ``--repeats``
runs after one warm-up, on ``--threads`` threads for both runtimes. Prints a markdown table (also written
to benchmarks/results/bench_onnx.md). Target: ONNX Runtime >= 2x faster than eager at 4K.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.export.onnx_export import export_onnx, frozen_rotations
from reformer_dist.export.ort_runner import OrtRunner

RESULTS = Path(__file__).resolve().parent / "results" / "bench_onnx.md"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, ORT's first-run planning)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sorts", nargs="+", default=["counting", "topk"], choices=["counting", "topk"])
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = ReformerConfig(vocab_size=256, d_model=256, n_heads=4, d_head=64, d_ff=1024, n_layers=args.layers,
                            attn_layers=["lsh"], lsh_chunk_len=64, lsh_n_hashes=2, max_seq_len=max(args.lengths),
                            axial_pos_shape=[max(args.lengths) // 64, 64])
    torch.manual_seed(0)
    model = ReformerLM(config).eval()
    rng = np.random.default_rng(0)
    inputs = {n: rng.integers(0, 256, (1, n)) for n in args.lengths}

    rows = {n: {} for n in args.lengths}
    with tempfile.TemporaryDirectory() as tmp:
        for sort in args.sorts:
            start = time.perf_counter()
            export_onnx(model, Path(tmp) / f"{sort}.onnx", sort=sort)
            print(f"exported the {sort}-sort graph in {time.perf_counter() - start:.0f} s", flush=True)
            runner = OrtRunner(Path(tmp) / f"{sort}.onnx", threads=args.threads)
            for n, ids in inputs.items():
                rows[n][f"ort_{sort}"] = median_ms(lambda ids=ids, r=runner: r.logits(ids), args.repeats)
                print(f"  ort {sort:8s} L={n:6d}: {rows[n][f'ort_{sort}']:9.1f} ms", flush=True)
    with frozen_rotations(model), torch.inference_mode():
        for n, ids in inputs.items():
            t = torch.from_numpy(ids)
            rows[n]["torch"] = median_ms(lambda t=t: model(t), args.repeats)
            print(f"  torch eager      L={n:6d}: {rows[n]['torch']:9.1f} ms", flush=True)

    header = "| length | PyTorch eager (ms) | " + " | ".join(f"ORT {s} sort (ms) | speed-up" for s in args.sorts) + " |"
    lines = [f"ONNX Runtime {__import__('onnxruntime').__version__} CPU vs PyTorch {torch.__version__} eager, "
             f"batch 1, {args.threads} threads, {args.layers} LSH layers, median of {args.repeats}", "",
             header, "|" + "---|" * (2 + 2 * len(args.sorts))]
    for n in args.lengths:
        cells = [f"{rows[n][f'ort_{s}']:.1f} | {rows[n]['torch'] / rows[n][f'ort_{s}']:.2f}x" for s in args.sorts]
        lines.append(f"| {n} | {rows[n]['torch']:.1f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"Command: .venv/bin/python benchmarks/bench_onnx.py --lengths "
                       f"{' '.join(map(str, args.lengths))} --repeats {args.repeats}\n\n{table}\n")


if __name__ == "__main__":
    main()

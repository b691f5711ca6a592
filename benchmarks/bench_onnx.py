"""Inference latency: ONNX Runtime (CPU) vs PyTorch eager, batch 1, on the benchmark Reformer.

    .venv/bin/python benchmarks/bench_onnx.py                       # lengths 1024 4096 16384
    .venv/bin/python benchmarks/bench_onnx.py --lengths 1024 --repeats 3

Model: byte vocab 256, 6 layers all LSH (bucket window), d_model 256, 4 heads x 64, d_ff 1024, chunk 64,
2 hashes, causal, fp32, random weights (latency does not depend on them). The model is exported once per
LSH body (counting sort, TopK sort) and each graph is timed at every length; medians over ``--repeats``
runs after one warm-up, on ``--threads`` threads for both runtimes. Prints a markdown table (also written
to benchmarks/results/bench_onnx.md). Target: ONNX Runtime >= 2x faster than eager at 4K.

Decode step (``--decode-contexts``): the prefill/decode graphs are exported too, a random prompt of each
context length is prefilled, then one cached decode step (batch 1) is timed: ONNX Runtime's decode graph
with the cache bound in place vs PyTorch's ``decode_step`` (in place, as its ``generate`` runs it).
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
from reformer_dist.export.generation_export import export_generation
from reformer_dist.export.onnx_export import export_onnx, frozen_rotations
from reformer_dist.export.ort_generate import OrtGenerator
from reformer_dist.export.ort_runner import OrtRunner
from reformer_dist.model.generation import decode_step, draw_rotations, prefill

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
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 4096],
                        help="context lengths at which one decode step is timed (none: skip)")
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
        decode = decode_latency(model, args, Path(tmp)) if args.decode_contexts else ""
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
    table = "\n".join(lines) + decode
    print("\n" + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"Command: .venv/bin/python benchmarks/bench_onnx.py --lengths "
                       f"{' '.join(map(str, args.lengths))} --repeats {args.repeats} --layers {args.layers} "
                       f"--decode-contexts {' '.join(map(str, args.decode_contexts))}\n\n{table}\n")


def decode_latency(model: ReformerLM, args: argparse.Namespace, tmp: Path) -> str:
    """Median latency of one cached decode step after prompts of each context length: a table."""
    start = time.perf_counter()
    export_generation(model, tmp / "gen.onnx")
    print(f"exported the prefill/decode graphs in {time.perf_counter() - start:.0f} s", flush=True)
    generator = OrtGenerator(tmp / "gen.onnx", threads=args.threads)
    rng = np.random.default_rng(1)
    lines = ["", "", f"Decode step (batch 1, {args.layers} LSH layers, median of {args.repeats}):", "",
             "| context | PyTorch decode_step (ms) | ORT decode graph (ms) | speed-up |", "|---|---|---|---|"]
    for n in args.decode_contexts:
        prompt = rng.integers(0, 256, n).tolist()
        _, advance = generator.start([prompt])
        token = np.array([7])
        ort_ms = median_ms(lambda f=advance, t=token: f(t), args.repeats)
        with frozen_rotations(model), torch.inference_mode():
            _, cache = prefill(model, torch.tensor([prompt]), None, draw_rotations(model, torch.Generator()))
            position = torch.tensor([n])
            torch_ms = median_ms(lambda p=position, c=cache: decode_step(model, torch.tensor([7]), p, c, inplace=True),
                                 args.repeats)
        print(f"  decode step context={n:6d}: torch {torch_ms:.2f} ms, ort {ort_ms:.2f} ms", flush=True)
        lines.append(f"| {n} | {torch_ms:.2f} | {ort_ms:.2f} | {torch_ms / ort_ms:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Inference latency on CPU: full sequence (PyTorch eager / ONNX Runtime fp32 / ONNX Runtime int8) and one
cached decode step (PyTorch / ONNX Runtime) against the context length, batch 1.

    .venv/bin/python benchmarks/bench_onnx.py                                 # 1K 4K 16K, decode 1K-16K
    .venv/bin/python benchmarks/bench_onnx.py --lengths 1024 4096 --decode-contexts 1024 4096 --repeats 3

Model: byte vocab 256, 6 layers all LSH (bucket window), d_model 256, 4 heads x 64, d_ff 1024, chunk 64,
2 hashes, causal, random weights (latency does not depend on them), max_seq_len = the longest length.
Exported once with ``export_onnx(..., generation=True)`` (counting-sort body: the TensorRT-parsable
default; ``--sort topk`` for the TopK body) and quantized with ``quantize_int8`` (what
``export onnx --precision int8`` runs). All runtimes get ``--threads`` threads.

Full sequence: the runtimes are timed in turn within each repeat (interleaved, so a busy machine slows
them alike; 0.1 s apart, so one runtime's spinning worker threads do not slow the next), median of
``--repeats`` after one warm-up. Decode step: a random prompt of each context length
is prefilled on both backends of the decoding runtime (``reformer_dist.decoding``: ``TorchBackend``,
``OrtBackend`` with the cache updated in place), then ``--steps`` decode steps are timed, interleaved.
Writes benchmarks/results/bench_onnx.md (with the command and the load average) and bench_onnx.png.
Targets: ORT int8 >= 1.5x ORT fp32 and >= 1.5x eager at 4K; decode step flat in the context.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see decoding.loading.quiet_openmp

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.decoding.onnxruntime_backend import OrtBackend
from reformer_dist.decoding.torch_backend import TorchBackend
from reformer_dist.export.metadata import generation_paths
from reformer_dist.export.onnx_export import export_onnx
from reformer_dist.export.ort_runner import OrtRunner
from reformer_dist.export.quantize import quantize_int8

RESULTS = Path(__file__).resolve().parent / "results"


def interleaved(fns: dict, repeats: int, pause: float = 0.0) -> dict[str, float]:
    """Median seconds of each callable, timed in turn within every repeat (after one warm-up each).
    ``pause``: seconds to sleep before each timed call, so that the previous runtime's worker threads
    (ONNX Runtime's spin after a run) have gone idle and do not compete with the next one."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per context")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sort", default="counting", choices=["counting", "topk"])
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    longest = max([*args.lengths, *(c + args.steps + 2 for c in args.decode_contexts)])
    longest = -(-longest // 64) * 64
    config = ReformerConfig(vocab_size=256, d_model=256, n_heads=4, d_head=64, d_ff=1024, n_layers=args.layers,
                            attn_layers=["lsh"], lsh_chunk_len=64, lsh_n_hashes=2, max_seq_len=longest,
                            axial_pos_shape=[longest // 64, 64])
    torch.manual_seed(0)
    model = ReformerLM(config).eval().freeze_rotations()  # the rotations the exported graphs hold
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        start = time.perf_counter()
        export_onnx(model, fp32, sort=args.sort, generation=bool(args.decode_contexts))
        quantize_int8(fp32, int8)
        print(f"exported and quantized in {time.perf_counter() - start:.0f} s", flush=True)
        runners = {"ORT fp32": OrtRunner(fp32, threads=args.threads), "ORT int8": OrtRunner(int8, threads=args.threads)}

        full = {}
        for n in args.lengths:
            ids = rng.integers(0, 256, (1, n))
            tensor = torch.from_numpy(ids)
            fns = {"eager": lambda t=tensor: eager(model, t),
                   **{name: (lambda r=r, ids=ids: r.logits(ids)) for name, r in runners.items()}}
            full[n] = interleaved(fns, args.repeats, pause=0.1)
            print(f"  L={n:6d}: " + "  ".join(f"{k} {1e3 * v:8.1f} ms" for k, v in full[n].items()), flush=True)

        decode = {}
        if args.decode_contexts:
            assert all(p.is_file() for p in generation_paths(fp32).values())
            backends = {"torch": TorchBackend(model, "cpu"), "onnxruntime": OrtBackend(fp32, threads=args.threads)}
            for n in args.decode_contexts:
                prompt = rng.integers(0, 256, n).tolist()
                states = {name: b.prefill([prompt])[0] for name, b in backends.items()}
                fns = {name: (lambda b=b, s=states[name]: b.decode(s, np.array([7]))) for name, b in backends.items()}
                decode[n] = interleaved(fns, args.steps)
                print(f"  decode after {n:6d}: " + "  ".join(f"{k} {1e3 * v:7.2f} ms" for k, v in decode[n].items()),
                      flush=True)

    write_results(args, full, decode)


@torch.inference_mode()
def eager(model: ReformerLM, ids: torch.Tensor) -> None:
    model(ids)


def write_results(args: argparse.Namespace, full: dict, decode: dict) -> None:
    import onnxruntime

    load = os.getloadavg()
    lines = [f"Command: .venv/bin/python benchmarks/bench_onnx.py {' '.join(sys.argv[1:])}".rstrip(), "",
             f"ONNX Runtime {onnxruntime.__version__} CPU, PyTorch {torch.__version__}, {args.threads} threads, "
             f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) "
             f"when it finished. {args.layers} LSH layers (bucket window), d_model 256, batch 1, {args.sort}-sort "
             f"body; medians of {args.repeats} interleaved repeats.", "",
             "Full sequence:", "",
             "| length | PyTorch eager (ms) | ORT fp32 (ms) | ORT int8 (ms) | fp32 vs eager | int8 vs fp32 | int8 vs eager |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in full.items():
        e, f, q = r["eager"], r["ORT fp32"], r["ORT int8"]
        lines.append(f"| {n} | {1e3 * e:.1f} | {1e3 * f:.1f} | {1e3 * q:.1f} | {e / f:.2f}x | {f / q:.2f}x | {e / q:.2f}x |")
    if decode:
        lines += ["", f"One cached decode step (median of {args.steps}, interleaved), batch 1:", "",
                  "| context | PyTorch (ms) | ONNX Runtime (ms) | ORT vs PyTorch |", "|---:|---:|---:|---:|"]
        for n, r in decode.items():
            lines.append(f"| {n} | {1e3 * r['torch']:.2f} | {1e3 * r['onnxruntime']:.2f} | "
                         f"{r['torch'] / r['onnxruntime']:.2f}x |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_onnx.md").write_text(table + "\n")
    plot(full, decode)


def plot(full: dict, decode: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    fig, axes = plt.subplots(1, 2 if decode else 1, figsize=(11 if decode else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    for name in ("eager", "ORT fp32", "ORT int8"):
        ax.plot(list(full), [1e3 * r[name] for r in full.values()], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms", title="full sequence, batch 1")
    ax.legend()
    if decode:
        ax = axes[0][1]
        for name in ("torch", "onnxruntime"):
            ax.plot(list(decode), [1e3 * r[name] for r in decode.values()], marker="o", label=name)
        ax.set(xscale="log", xlabel="context length", ylabel="ms", title="one cached decode step", ylim=(0, None))
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "bench_onnx.png", dpi=110)


if __name__ == "__main__":
    main()

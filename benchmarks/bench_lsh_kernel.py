"""LSH attention on one GPU: fused Triton kernels vs the PyTorch implementation vs full SDPA (flash) attention.

For every length, each variant runs ``--warmup`` untimed and ``--repeats`` timed forward+backward passes of
the attention op alone (the qk/v/output projections are the same for all three), each on fresh random
inputs; times come from CUDA events, the table shows medians. Variants:

- ``pytorch``: ``lsh_attention_reference`` + the op's flash-style PyTorch backward (REFORMER_DISABLE_TRITON=1)
- ``triton``:  ``lsh_attention_triton`` + ``lsh_attention_backward_triton`` (hashing and sorting included)
- ``sdpa``:    full causal attention, ``F.scaled_dot_product_attention`` forced to the flash backend

The fused kernels are also timed alone (forward kernel; backward kernel) on pre-sorted inputs, and their
bytes-moved model (below) divided by the time is compared with the measured device-to-device copy
bandwidth and, where torch reports memory clock and bus width, the spec peak.

    python benchmarks/bench_lsh_kernel.py                          # L = 4K .. 256K, both windows, bf16
    python benchmarks/bench_lsh_kernel.py --lengths 4096,16384 --windows bucket --out benchmarks/results

On a machine without CUDA it prints that it needs a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_LENGTHS = "4096,8192,16384,32768,65536,131072,262144"


# ------------------------------------------------------------------------------------------ byte models
def kernel_bytes(batch_heads: int, length: int, d: int, n_hashes: int, elem: int, window: str) -> dict[str, int]:
    """Compulsory global-memory bytes of the two fused kernels, per call.

    Every gathered row is counted once per hash round (re-reads of a neighbouring chunk's keys are
    assumed to hit L2), index tensors are int64, statistics and gradient partials fp32:

    - forward: sorted index (+ bucket key for 'bucket'), qk and v rows, per-round output and 2 stats
    - backward: sorted index (+ bucket key), qk, v and dO rows, 3 probability terms + delta, fp32 dqk/dv partials
    """
    rows = batch_heads * n_hashes * length
    index = 8 * (2 if window == "bucket" else 1)
    forward = rows * (index + 2 * d * elem + d * elem + 2 * 4)
    backward = rows * (index + 3 * d * elem + 4 * 4 + 2 * d * 4)
    return {"forward": forward, "backward": backward}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write of a 1 GiB buffer), median of 5."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = timed(lambda: None, lambda _: dst.copy_(src), repeats=5, warmup=1)
    return 2 * src.numel() / statistics.median(times)


def spec_bandwidth(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth (2 transfers per clock x bus width) if torch reports both, else None."""
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8


# ---------------------------------------------------------------------------------------------- timing
def timed(setup: Callable[[], object], run: Callable[[object], object], repeats: int, warmup: int) -> list[float]:
    """Seconds per ``run(setup())`` from CUDA events; setup (fresh inputs) runs outside the timed region."""
    times = []
    for i in range(warmup + repeats):
        state = setup()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(state)
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return times


def lsh_inputs(args: argparse.Namespace, length: int, window: str, seed: int):
    """Fresh qk, v, rotations and output gradient, (B, H, L, D) in the benchmark dtype, and the LshSpec."""
    from reformer_dist.model.config import ReformerConfig

    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, length, args.d_head)
    spec = ReformerConfig(max_seq_len=length, lsh_chunk_len=args.chunk_len, lsh_n_hashes=args.n_hashes,
                          lsh_window=window).lsh_spec()
    qk = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    rotations = torch.randn(args.heads, args.d_head, args.n_hashes, sum(spec.n_buckets) // 2, device="cuda", generator=g)
    grad = torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    return qk, v, rotations, grad, spec


def measure_length(args: argparse.Namespace, length: int, window: str, bandwidth: float) -> dict:
    from reformer_dist.model.lsh.dispatch import DISABLE_ENV
    from reformer_dist.model.lsh.forward import lsh_attention_reference
    from reformer_dist.model.lsh.layout import sort_by_bucket
    from reformer_dist.model.lsh.triton_kernels import (
        _backward_rounds,
        _forward_rounds,
        _probability_terms,
        lsh_attention_backward_triton,
        lsh_attention_triton,
    )

    seeds = iter(range(10**6))

    def setup():
        return lsh_inputs(args, length, window, next(seeds))

    def run_triton(state):
        qk, v, rotations, grad, spec = state
        out, buckets = lsh_attention_triton(qk, v, rotations, None, None, spec)
        lsh_attention_backward_triton(grad, qk, v, out, buckets, None, spec)

    def run_pytorch(state):
        qk, v, rotations, grad, spec = state
        with torch.no_grad():
            out, buckets = lsh_attention_reference(qk, v, rotations, None, None, spec)
        torch.ops.reformer.lsh_attention_backward(grad, qk, v, out, buckets, None, None, *spec.op_args(), 0.0, 0)

    row: dict = {"length": length, "window": window}
    variants = {"triton": run_triton, "pytorch": run_pytorch}
    if length > args.pytorch_max_length:
        variants.pop("pytorch")
        row["pytorch_ms"] = "skipped"
    saved_env = os.environ.get(DISABLE_ENV)
    for name, run in variants.items():
        torch.cuda.reset_peak_memory_stats()
        os.environ[DISABLE_ENV] = "1" if name == "pytorch" else "0"  # the op's backward dispatches on it
        try:
            row[f"{name}_ms"] = 1e3 * statistics.median(timed(setup, run, args.repeats, args.warmup))
            row[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.cuda.OutOfMemoryError:
            row[f"{name}_ms"] = "OOM"
        finally:
            if saved_env is None:
                os.environ.pop(DISABLE_ENV, None)
            else:
                os.environ[DISABLE_ENV] = saved_env
        torch.cuda.empty_cache()

    # agreement of the two implementations on one input (sanity, printed, not asserted)
    qk, v, rotations, _, spec = setup()
    out_t, buckets = lsh_attention_triton(qk, v, rotations, None, None, spec)
    if "pytorch" in variants:
        out_r, _ = lsh_attention_reference(qk, v, rotations, None, buckets, spec)
        row["max_abs_diff"] = (out_t.float() - out_r.float()).abs().max().item()

    # the fused kernels alone, on pre-sorted inputs, against the bytes-moved model
    def setup_kernels():
        qk, v, rotations, grad, spec = setup()
        out, buckets = lsh_attention_triton(qk, v, rotations, None, None, spec)
        sorted_idx, bucket_key = sort_by_bucket(buckets)
        _, row_max, log_sum = _forward_rounds(qk, v, sorted_idx, bucket_key, None, spec, 0.0, 0, True)
        terms = _probability_terms(row_max, log_sum, spec)
        delta = (grad.float() * out.float()).sum(-1).flatten(0, 1)
        return qk, v, grad, sorted_idx, bucket_key, spec, (terms, delta)

    def run_fwd_kernel(state):
        qk, v, _, sorted_idx, bucket_key, spec, _ = state
        _forward_rounds(qk, v, sorted_idx, bucket_key, None, spec, 0.0, 0, stats_only=False)

    def run_bwd_kernel(state):
        qk, v, grad, sorted_idx, bucket_key, spec, (terms, delta) = state
        _backward_rounds(qk, v, grad, terms, delta, sorted_idx, bucket_key, None, spec, 0.0, 0)

    model = kernel_bytes(args.batch * args.heads, length, args.d_head, args.n_hashes, qk.element_size(), window)
    for name, run in (("forward", run_fwd_kernel), ("backward", run_bwd_kernel)):
        seconds = statistics.median(timed(setup_kernels, run, args.repeats, args.warmup))
        row[f"{name}_kernel_ms"] = 1e3 * seconds
        row[f"{name}_kernel_bw_fraction"] = model[name] / seconds / bandwidth

    def setup_sdpa():
        qk, v, _, grad, _ = setup()
        q = qk.detach().requires_grad_()
        k = torch.randn_like(qk).requires_grad_()
        return q, k, v.detach().requires_grad_(), grad

    def run_sdpa(state):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, grad = state
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)

    torch.cuda.reset_peak_memory_stats()
    try:
        row["sdpa_ms"] = 1e3 * statistics.median(timed(setup_sdpa, run_sdpa, args.repeats, args.warmup))
        row["sdpa_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except (torch.cuda.OutOfMemoryError, RuntimeError) as err:  # flash needs sm80+ and fp16/bf16
        row["sdpa_ms"] = f"unavailable ({type(err).__name__})"
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------- output
def fmt(x, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) else "-"


def table(rows: list[dict]) -> str:
    head = ("| window | L | PyTorch ms | Triton ms | PyTorch/Triton | SDPA flash ms | SDPA/Triton | fwd kernel ms "
            "(% BW) | bwd kernel ms (% BW) | peak GiB Triton / PyTorch | max abs diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['window']} | {r['length']} | {fmt(r.get('pytorch_ms'), '.1f')} | {fmt(r['triton_ms'], '.1f')} | "
            f"{ratio(r.get('pytorch_ms'), r['triton_ms'])} | {fmt(r['sdpa_ms'], '.1f')} | "
            f"{ratio(r['sdpa_ms'], r['triton_ms'])} | {r['forward_kernel_ms']:.2f} "
            f"({100 * r['forward_kernel_bw_fraction']:.0f}%) | {r['backward_kernel_ms']:.2f} "
            f"({100 * r['backward_kernel_bw_fraction']:.0f}%) | {fmt(r.get('triton_peak_gib'))} / "
            f"{fmt(r.get('pytorch_peak_gib'))} | {fmt(r.get('max_abs_diff'), '.2e')} |")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="comma-separated sequence lengths")
    p.add_argument("--windows", default="bucket,chunk", help="comma-separated: bucket, chunk")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--n-hashes", type=int, default=2)
    p.add_argument("--chunk-len", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pytorch-max-length", type=int, default=1 << 18, help="skip the PyTorch variant above this")
    p.add_argument("--out", type=Path, default=None, help="directory for bench_lsh_kernel.{md,json}")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_lsh_kernel: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return 0
    import reformer_dist.model.lsh  # noqa: F401  (registers torch.ops.reformer.*)

    device = torch.device("cuda")
    copy_bw, spec_bw = copy_bandwidth(device), spec_bandwidth(device)
    header = (f"device: {torch.cuda.get_device_name(device)}; copy bandwidth {copy_bw / 1e12:.2f} TB/s"
              + (f", spec {spec_bw / 1e12:.2f} TB/s" if spec_bw else "")
              + f"; B={args.batch} H={args.heads} D={args.d_head} n_hashes={args.n_hashes} chunk={args.chunk_len} "
              f"{args.dtype}, causal, median of {args.repeats} (CUDA events, fresh inputs); % BW = bytes-moved "
              "model / time / copy bandwidth")
    print(header, flush=True)
    rows = []
    for window in args.windows.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            rows.append(measure_length(args, length, window, copy_bw))
            print(json.dumps(rows[-1]), flush=True)
    text = header + "\n\n" + table(rows) + "\n\ncommand: python " + " ".join(sys.argv) + "\n"
    print("\n" + text)
    if args.out is not None:
        write_atomic(args.out / "bench_lsh_kernel.md", text)
        write_atomic(args.out / "bench_lsh_kernel.json", json.dumps({"header": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

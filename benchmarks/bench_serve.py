"""Serving throughput and latency: `reformer-dist serve` under 1, 8 and 32 concurrent clients.

    .venv/bin/python benchmarks/bench_serve.py                                  # torch + onnxruntime, CPU
    .venv/bin/python benchmarks/bench_serve.py --concurrency 1 8 --requests 16 --max-tokens 16
    .venv/bin/python benchmarks/bench_serve.py --backends tensorrt --plan model.plan   # on a GPU machine

Model: the `tiny` config (byte vocab, 4 layers local+LSH, d_model 128, max_seq_len 1024) with random
weights (speed does not depend on them), saved as a native checkpoint (torch backend) and exported to
ONNX (onnxruntime backend). Each backend gets its own server process on a free loopback port; each
client sends greedy completions of a 64-byte prompt for ``--max-tokens`` tokens, one after another, and
``--requests`` completions are spread over the clients of a level. Reported per (backend, concurrency):
generated tokens per second of wall time, p50/p99 request latency, and the mean decode batch size
(from the server's /metrics). Clients and server share the machine's cores. Prints a markdown table
(also written to benchmarks/results/bench_serve.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_serve.md"
PROMPT = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"[:64]


def build_models(tmp: Path, backends: list[str], threads: int) -> dict[str, Path]:
    """A random `tiny` model as a native checkpoint and, if needed, an ONNX export."""
    import torch

    from reformer_dist.model import ReformerConfig, ReformerLM
    from reformer_dist.model.native import save_native

    torch.set_num_threads(threads)
    model_section = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**{**model_section, "dropout": 0.0, "hash_seed": 0})).eval()
    paths = {"torch": save_native(model, tmp / "tiny", tokenizer={"kind": "bytes", "offset": 0})}
    if "onnxruntime" in backends:
        from reformer_dist.export.onnx_export import export_onnx

        start = time.perf_counter()
        export_onnx(model, tmp / "tiny.onnx", tokenizer={"kind": "bytes", "offset": 0})
        print(f"exported tiny.onnx in {time.perf_counter() - start:.0f} s", flush=True)
        paths["onnxruntime"] = tmp / "tiny.onnx"
    return paths


def start_server(backend: str, model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "reformer_dist", "serve", "--model", str(model), "--backend", backend,
           "--port", "0", "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
           "--max-concurrency", str(max(64, 2 * max(args.concurrency))), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split("listening on ")[1].strip()
        print("  server: " + line, end="")
    raise RuntimeError(f"the {backend} server did not start")


def batch_stats(client: httpx.Client) -> tuple[float, float]:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "reformer_batch_size":
            values = {s.name: s.value for s in family.samples}
            return values["reformer_batch_size_sum"], values["reformer_batch_size_count"]
    return 0.0, 0.0


async def run_level(url: str, concurrency: int, n_requests: int, max_tokens: int) -> tuple[list[float], int, float]:
    """``n_requests`` completions over ``concurrency`` clients: (latencies s, generated tokens, wall s)."""
    queue = list(range(n_requests))
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            start = time.perf_counter()
            r = await http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens,
                                                          "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        return latencies, tokens, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                        choices=["torch", "onnxruntime", "tensorrt"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="completions per level (at least 2x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="model threads in the server")
    parser.add_argument("--plan", type=Path, default=None, help="TensorRT engine of the tiny model (tensorrt)")
    args = parser.parse_args()
    if "tensorrt" in args.backends and args.plan is None:
        parser.error("--backends tensorrt needs --plan (build it with `reformer-dist export tensorrt`)")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), args.backends, args.threads)
        if args.plan is not None:
            models["tensorrt"] = args.plan
        for backend in args.backends:
            proc, url = start_server(backend, models[backend], args)
            try:
                with httpx.Client(base_url=url, timeout=600) as http:
                    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4}).raise_for_status()
                    for c in args.concurrency:
                        before = batch_stats(http)
                        lat, tokens, wall = asyncio.run(run_level(url, c, max(args.requests, 2 * c), args.max_tokens))
                        after = batch_stats(http)
                        steps = after[1] - before[1]
                        rows.append((backend, c, len(lat), tokens / wall, 1e3 * percentile(lat, 50),
                                     1e3 * percentile(lat, 99), (after[0] - before[0]) / steps if steps else 0.0))
                        print(f"  {backend:12s} c={c:3d}: {rows[-1][3]:8.1f} tok/s  p50 {rows[-1][4]:8.1f} ms  "
                              f"p99 {rows[-1][5]:8.1f} ms  batch {rows[-1][6]:.1f}", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)

    lines = [f"`reformer-dist serve`, tiny config (random weights), prompt {len(PROMPT)} bytes, greedy "
             f"{args.max_tokens} tokens per request, max batch {args.max_batch_size}, {args.threads} model "
             f"thread(s), {os.cpu_count()} cores shared with the clients", "",
             "| backend | concurrency | requests | generated tokens/s | p50 latency (ms) | p99 latency (ms) "
             "| mean decode batch |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {b} | {c} | {n} | {tps:.1f} | {p50:.1f} | {p99:.1f} | {batch:.2f} |"
              for b, c, n, tps, p50, p99, batch in rows]
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"Command: .venv/bin/python benchmarks/bench_serve.py {' '.join(sys.argv[1:])}\n\n{table}\n")


if __name__ == "__main__":
    main()

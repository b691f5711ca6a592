"""Serving throughput and latency: `reformer-dist serve` per backend, prompts of 64 / 1K / 4K tokens,
1 / 8 / 32 concurrent clients; and whether cached decoding stays flat as the prompt grows.

    .venv/bin/python benchmarks/bench_serve.py                                  # torch + onnxruntime, CPU
    .venv/bin/python benchmarks/bench_serve.py --prompts 64 1024 --concurrency 1 8 --max-tokens 16
    .venv/bin/python benchmarks/bench_serve.py --backends tensorrt --plan model.plan --flat-plan tiny.plan  # GPU

Models (random weights: speed does not depend on them), byte vocab, saved as native checkpoints (torch)
and exported with ``--generation`` (onnxruntime, cached decoding through the prefill/decode graphs):

- ``serving``: the `tiny` config (4 layers local + LSH, d_model 128, d_ff 512) with max_seq_len 4160;
- ``flat``: a tiny 2-layer model (local + LSH, d_model 32, 2 heads x 16, d_ff 64) accepting 4K tokens, for
  the flat-decoding target: one request at a time, 32 greedy tokens after a 64-token and a 4,000-token prompt.

Each backend gets its own server process on a free loopback port (the serving table's with ``--threads``
model threads, leaving cores to the clients; the flat check's as a user starts it, with the runtime's
default threads); clients stream greedy completions (so the first token's arrival is seen) and share the
machine's cores with it.
Reported per level: generated tokens per second of wall time, p50/p99 request latency, p50 time to the
first token, the mean decode batch (from /metrics); for the flat check, per prompt length, tokens/s over
the whole request and over decoding alone (after the first token), and the 4K / 64 ratios. Writes
benchmarks/results/bench_serve.md with the command and the load average.
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
TEXT = "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 100
FLAT_PROMPTS = (64, 4000)


def model_configs() -> dict[str, dict]:
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    serving = {**tiny, "dropout": 0.0, "max_seq_len": 4160, "axial_pos_shape": [65, 64]}
    flat = dict(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=2, attn_layers=["local", "lsh"],
                lsh_chunk_len=32, local_chunk_len=32, max_seq_len=4160, axial_pos_shape=[65, 64], axial_pos_dims=[16, 16])
    return {"serving": serving, "flat": flat}


def build_models(tmp: Path, backends: list[str]) -> dict[tuple[str, str], Path]:
    """(model, backend) -> the path a server opens."""
    import torch

    from reformer_dist.artifacts.native import save_native
    from reformer_dist.export.onnx_export import export_onnx
    from reformer_dist.model import ReformerConfig, ReformerLM

    paths = {}
    for name, section in model_configs().items():
        torch.manual_seed(0)
        model = ReformerLM(ReformerConfig(**section)).eval()
        paths[name, "torch"] = save_native(model, tmp / name, tokenizer={"kind": "bytes", "offset": 0})
        if "onnxruntime" in backends:
            start = time.perf_counter()
            export_onnx(model, tmp / name / "model.onnx", tokenizer={"kind": "bytes", "offset": 0}, generation=True)
            print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)
            paths[name, "onnxruntime"] = tmp / name / "model.onnx"
    return paths


def start_server(model: Path, args: argparse.Namespace, threads: int | None) -> tuple[subprocess.Popen, str]:
    """A server on ``model`` with ``threads`` model threads (None: the server's default, the runtime's choice)."""
    cmd = [sys.executable, "-m", "reformer_dist", "serve", "--model", str(model), "--port", "0",
           "--max-batch-size", str(args.max_batch_size), "--max-tokens-cap", "512",
           "--max-concurrency", str(max(64, 2 * max(args.concurrency))), "--log-level", "warning"]
    env = dict(os.environ)
    if threads is not None:
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.split("listening on ")[1].strip()
        print("  server: " + line, end="")
    raise RuntimeError(f"the server for {model} did not start")


def batch_stats(client: httpx.Client) -> tuple[float, float]:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "reformer_batch_size":
            values = {s.name: s.value for s in family.samples}
            return values["reformer_batch_size_sum"], values["reformer_batch_size_count"]
    return 0.0, 0.0


async def completion(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed greedy completion: (seconds to the first token, seconds to the last, tokens)."""
    start = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and first is None and '"text": ""' not in line:
                first = time.perf_counter() - start
            if '"usage"' in line and '"completion_tokens"' in line:
                tokens = int(line.split('"completion_tokens": ')[1].split(",")[0])
    return first or time.perf_counter() - start, time.perf_counter() - start, tokens


async def run_level(url: str, prompt: str, concurrency: int, n_requests: int,
                    max_tokens: int) -> tuple[list[tuple[float, float, int]], float]:
    """``n_requests`` completions over ``concurrency`` clients: per request (ttft, latency, tokens), wall."""
    queue, results = list(range(n_requests)), []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            queue.pop()
            results.append(await completion(http, prompt, max_tokens))

    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
        return results, time.perf_counter() - start


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                        choices=["torch", "onnxruntime", "tensorrt"])
    parser.add_argument("--prompts", type=int, nargs="+", default=[64, 1024, 4096], help="prompt lengths (tokens)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=8, help="completions per level (at least 2x concurrency)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="model threads of the serving table's servers (the flat check's use the default)")
    parser.add_argument("--flat-requests", type=int, default=10, help="requests per prompt length in the flat check")
    parser.add_argument("--plan", type=Path, default=None, help="TensorRT engine of the serving model (tensorrt)")
    parser.add_argument("--flat-plan", type=Path, default=None, help="TensorRT engine of the flat model (tensorrt)")
    args = parser.parse_args()
    if "tensorrt" in args.backends and (args.plan is None or args.flat_plan is None):
        parser.error("--backends tensorrt needs --plan and --flat-plan (`reformer-dist export tensorrt`)")

    table, flat = [], []
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(Path(tmp), args.backends)
        if "tensorrt" in args.backends:
            models["serving", "tensorrt"], models["flat", "tensorrt"] = args.plan, args.flat_plan
        for backend in args.backends:
            proc, url = start_server(models["flat", backend], args, None)  # as a user starts it
            try:
                asyncio.run(run_level(url, TEXT[:64], 1, 1, 4))  # warm-up
                for n in FLAT_PROMPTS:
                    # per request: 32 tokens / its latency; decoding alone: a 65-token request minus a 1-token
                    # one (prefill + first token), medians of interleaved requests (streamed first-token
                    # times are blurred by the server's event loop)
                    latency: dict[int, list[float]] = {1: [], 32: [], 65: []}
                    for _ in range(args.flat_requests):
                        for tokens, lat in latency.items():
                            lat.append(asyncio.run(run_level(url, TEXT[:n], 1, 1, tokens))[0][0][1])
                    median = {tokens: statistics.median(lat) for tokens, lat in latency.items()}
                    e2e, decode = 32 / median[32], 64 / (median[65] - median[1])
                    flat.append((backend, n, e2e, decode))
                    print(f"  flat {backend:12s} prompt {n:5d}: {e2e:7.1f} tok/s per request, {decode:7.1f} tok/s "
                          f"decoding", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
            proc, url = start_server(models["serving", backend], args, args.threads)
            try:
                with httpx.Client(base_url=url, timeout=900) as http:
                    asyncio.run(run_level(url, TEXT[:64], 1, 1, 4))  # warm-up
                    for n in args.prompts:
                        for c in args.concurrency:
                            before = batch_stats(http)
                            results, wall = asyncio.run(run_level(url, TEXT[:n], c, max(args.requests, 2 * c),
                                                                  args.max_tokens))
                            after = batch_stats(http)
                            steps = after[1] - before[1]
                            lat, ttft = [r[1] for r in results], [r[0] for r in results]
                            row = (backend, n, c, len(results), sum(r[2] for r in results) / wall,
                                   1e3 * percentile(lat, 50), 1e3 * percentile(lat, 99), 1e3 * percentile(ttft, 50),
                                   (after[0] - before[0]) / steps if steps else 0.0)
                            table.append(row)
                            print(f"  {backend:12s} prompt {n:5d} c={c:3d}: {row[4]:8.1f} tok/s  p50 {row[5]:8.1f} ms  "
                                  f"p99 {row[6]:8.1f} ms  ttft {row[7]:8.1f} ms  batch {row[8]:.1f}", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=120)
    write_results(args, table, flat)


def write_results(args: argparse.Namespace, table: list, flat: list) -> None:
    load = os.getloadavg()
    lines = [f"Command: .venv/bin/python benchmarks/bench_serve.py {' '.join(sys.argv[1:])}".rstrip(), "",
             f"{os.cpu_count()} cores shared by the server and its clients; load average {load[0]:.1f} / "
             f"{load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) when it finished.", "",
             f"Flat decoding: a tiny 2-layer model accepting 4K tokens, served as a user starts it (`reformer-dist "
             f"serve --model ...`: the runtime's default threads), one request at a time, greedy; "
             f"per request = 32 tokens / the latency of a 32-token request (prefill included), decoding = 64 / "
             f"(latency of a 65-token request - latency of a 1-token one); medians of {args.flat_requests} "
             f"interleaved requests each. Target: 4K / 64 >= 0.7.", "",
             "| backend | prompt | tokens/s per request | tokens/s decoding |", "|---|---:|---:|---:|"]
    lines += [f"| {b} | {n} | {e2e:.1f} | {dec:.1f} |" for b, n, e2e, dec in flat]
    for backend in dict.fromkeys(b for b, *_ in flat):
        rows = {n: (e2e, dec) for b, n, e2e, dec in flat if b == backend}
        lo, hi = rows[FLAT_PROMPTS[0]], rows[FLAT_PROMPTS[1]]
        lines.append(f"\n{backend}: 4K / 64 = {hi[0] / lo[0]:.3f} per request, {hi[1] / lo[1]:.3f} decoding")
    lines += ["", f"Serving: the `tiny` config (4 layers, d_model 128) accepting 4K tokens, {args.threads} model "
                  f"thread(s) (the other cores are left to the clients), greedy {args.max_tokens} "
                  f"tokens per request, max batch {args.max_batch_size}, max(2 x concurrency, {args.requests}) requests "
                  f"per level.", "",
              "| backend | prompt | concurrency | requests | generated tokens/s | p50 latency (ms) | p99 latency (ms) "
              "| p50 first token (ms) | mean decode batch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {b} | {n} | {c} | {r} | {tps:.1f} | {p50:.1f} | {p99:.1f} | {ttft:.1f} | {batch:.2f} |"
              for b, n, c, r, tps, p50, p99, ttft, batch in table]
    text = "\n".join(lines)
    print("\n" + text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()

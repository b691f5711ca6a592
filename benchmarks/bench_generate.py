"""Generation speed, batch 1, CPU: HF transformers' ``generate`` (the anchor) vs our decoding runtime on
PyTorch and ONNX Runtime, cached and uncached; and ``reformer-dist generate --checkpoint`` vs ``--model``.

    .venv/bin/python benchmarks/bench_generate.py                       # prompts 1024, 4096 and 8192
    .venv/bin/python benchmarks/bench_generate.py --prompts 1024 --new-tokens 17 --cli-runs 1

Model (random weights; speed does not depend on them): byte vocab 256, 6 layers all LSH, d_model 256,
4 heads x 64, d_ff 1024, chunk 64, 2 hashes, 128 buckets, hash_seed 0, fp32. One random HF
``ReformerModelWithLMHead`` (transformers 4.57.6) is built and saved; ours are loaded from it:

- ``HF generate``          ``use_cache=True`` (its bucket + hidden-state cache), no feed-forward chunking
                           (its fastest settings for decoding), under ``torch.inference_mode``; uncached:
                           ``use_cache=False``
- ``ours, chunk window``   ``from_hf`` (chunk windows, HF's algorithm in fixed shapes), PyTorch backend
- ``ours, bucket window``  the same weights with ``lsh_window="bucket"``, PyTorch backend and ONNX Runtime
                           backend (``export_onnx(generation=True)``, cache updated in place)

"ours" runs ``reformer_dist.decoding.generate_stream``: the runtime ``reformer-dist serve`` and
``generate`` run. Every token is time-stamped as it is produced (a streamer for HF). Prefill = time to the
first new token; cached tokens/s = (N - 1) / (time of token N - time of token 1); uncached = the whole
sequence recomputed per token (``--uncached-tokens`` of them). All on ``--threads`` threads.

CLI: the quickstart's `tiny` config (random weights) saved and exported with ``--generation``; both
``reformer-dist generate`` commands run ``--cli-runs`` times each, alternating, with the printed tokens/s
(``--max-new-tokens 200``, greedy) compared by their medians.

Writes benchmarks/results/bench_generate.md with the command and the load average. Targets: cached
>= 10x uncached at 8K; ours cached >= 5x HF's cached tokens/s at 4K; ``--checkpoint`` >= 0.8x
``--model`` tokens/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch, as the CLI does (decoding.loading)

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def hf_model(max_len: int):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.ReformerConfig(
        vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64, feed_forward_size=1024,
        attn_layers=["lsh"] * 6, lsh_attn_chunk_length=64, num_hashes=2, num_buckets=128, hash_seed=0,
        axial_pos_shape=[128, max_len // 128], axial_pos_embds_dim=[128, 128], max_position_embeddings=max_len,
        is_decoder=True, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, pad_token_id=0,
        eos_token_id=None, chunk_size_feed_forward=0)
    torch.manual_seed(0)
    return transformers.ReformerModelWithLMHead(config).eval()


def hf_times(model, prompt: list[int], n: int, use_cache: bool) -> list[float]:
    """Seconds from the call to each new token of HF's generate."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt
                self.times.append(time.perf_counter())

        def end(self):
            pass

    stamps = Stamps()
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       use_cache=use_cache, streamer=stamps, pad_token_id=0)
    return [t - start for t in stamps.times]


def ours_times(backend, prompt: list[int], n: int) -> list[float]:
    """Seconds from the call to each new token of our decoding runtime (cached)."""
    from reformer_dist.decoding import SamplingParams, generate_stream

    times, start = [], time.perf_counter()
    for _ in generate_stream(backend, [prompt], SamplingParams(max_tokens=n, temperature=0)):
        times.append(time.perf_counter() - start)
    return times


def recomputed_times(backend, prompt: list[int], n: int) -> list[float]:
    """Seconds to each new token when every step recomputes the whole sequence (the uncached baseline)."""
    seq, times, start = list(prompt), [], time.perf_counter()
    for _ in range(n):
        seq.append(int(backend.last_logits([seq])[0].argmax()))
        times.append(time.perf_counter() - start)
    return times


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def generation_table(args: argparse.Namespace) -> tuple[list[str], dict]:
    from reformer_dist.artifacts.hf_checkpoint import from_hf
    from reformer_dist.decoding.onnxruntime_backend import OrtBackend
    from reformer_dist.decoding.torch_backend import TorchBackend
    from reformer_dist.export.onnx_export import export_onnx
    from reformer_dist.model import ReformerLM

    prompts = args.prompts
    max_len = max(16384, 128 * -(-(max(prompts) + args.new_tokens) // 128))
    hf = hf_model(max_len)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        chunk = from_hf(tmp)
        bucket = ReformerLM(dataclasses.replace(chunk.config, lsh_window="bucket")).eval()
        bucket.load_state_dict(chunk.state_dict())
        start = time.perf_counter()
        export_onnx(bucket, Path(tmp) / "bucket.onnx", generation=True)
        print(f"exported the bucket-window model in {time.perf_counter() - start:.0f} s", flush=True)
        backends = {"ours, chunk window (HF algorithm), PyTorch": TorchBackend(chunk, "cpu"),
                    "ours, bucket window, PyTorch": TorchBackend(bucket, "cpu"),
                    "ours, bucket window, ONNX Runtime": OrtBackend(Path(tmp) / "bucket.onnx", threads=args.threads)}
        rows = ["| prompt | implementation | prefill s | cached tok/s | uncached tok/s | cached / uncached | vs HF cached |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        results = {}
        for length in prompts:
            prompt = torch.randint(2, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
            hf_cached = hf_times(hf, prompt, args.new_tokens, True)
            hf_uncached = rate(hf_times(hf, prompt, args.uncached_tokens, False))
            results[length, "HF"] = rate(hf_cached)
            rows.append(f"| {length} | HF generate (4.57.6) | {hf_cached[0]:.2f} | {rate(hf_cached):.1f} | "
                        f"{hf_uncached:.2f} | {rate(hf_cached) / hf_uncached:.0f}x | 1.00x |")
            print(rows[-1], flush=True)
            for name, backend in backends.items():
                cached = ours_times(backend, prompt, args.new_tokens)
                results[length, name] = rate(cached)
                uncached = "" if "ONNX" in name else rate(recomputed_times(backend, prompt, args.uncached_tokens))
                ratio = f"{rate(cached) / uncached:.0f}x" if uncached else ""
                rows.append(f"| {length} | {name} | {cached[0]:.2f} | {rate(cached):.1f} | "
                            f"{f'{uncached:.2f}' if uncached else '—'} | {ratio or '—'} | "
                            f"{rate(cached) / results[length, 'HF']:.2f}x |")
                print(rows[-1], flush=True)
    return rows, results


def cli_table(args: argparse.Namespace) -> tuple[list[str], float]:
    """Medians of the tokens/s `reformer-dist generate` prints for --checkpoint and --model."""
    from reformer_dist.artifacts.native import save_native
    from reformer_dist.model import ReformerConfig, ReformerLM

    section = {**yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"], "dropout": 0.0}
    torch.manual_seed(0)
    speeds: dict[str, list[float]] = {"--checkpoint": [], "--model": []}
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_native(ReformerLM(ReformerConfig(**section)), Path(tmp) / "tiny",
                                tokenizer={"kind": "bytes", "offset": 0})
        command = [sys.executable, "-m", "reformer_dist"]
        subprocess.run([*command, "export", "onnx", "--checkpoint", str(directory), "--output",
                        str(directory / "model.onnx"), "--generation"], check=True, capture_output=True)
        for _ in range(args.cli_runs):
            for flag, path in (("--checkpoint", directory), ("--model", directory / "model.onnx")):
                out = subprocess.run([*command, "generate", flag, str(path), "--prompt", "def main(",
                                      "--max-new-tokens", "200", "--temperature", "0"],
                                     check=True, capture_output=True, text=True)
                speeds[flag].append(float(out.stderr.strip().split(", ")[-1].split(" tokens/s")[0]))
                print(f"  generate {flag}: {speeds[flag][-1]:.1f} tokens/s", flush=True)
    medians = {flag: statistics.median(s) for flag, s in speeds.items()}
    ratio = medians["--checkpoint"] / medians["--model"]
    rows = ["| command | tokens/s (median) | runs |", "|---|---:|---|",
            *(f"| `reformer-dist generate {flag}` | {m:.1f} | {', '.join(f'{v:.0f}' for v in speeds[flag])} |"
              for flag, m in medians.items()),
            "", f"`--checkpoint` / `--model` = {ratio:.2f} (target >= 0.8)"]
    return rows, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1024, 4096, 8192], help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, default=33, help="tokens per cached run (default 33)")
    parser.add_argument("--uncached-tokens", type=int, default=3, help="tokens per uncached run (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cli-runs", type=int, default=3, help="runs of each generate command (0: skip)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for bench_generate.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)

    rows, results = generation_table(args)
    cli_rows, _ = cli_table(args) if args.cli_runs else ([], None)
    load = os.getloadavg()
    lines = [f"Command: .venv/bin/python benchmarks/bench_generate.py {' '.join(sys.argv[1:])}".rstrip(), "",
             f"{args.threads} threads, PyTorch {torch.__version__}, {os.cpu_count()} cores, load average {load[0]:.1f} / "
             f"{load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) when it finished; {args.new_tokens} cached / "
             f"{args.uncached_tokens} uncached tokens per run, batch 1.", "", *rows]
    anchor = 4096 if 4096 in args.prompts else max(args.prompts)
    best = max(v for (n, name), v in results.items() if n == anchor and name != "HF")
    lines += ["", f"At a {anchor}-token prompt: our fastest cached decoding {best / results[anchor, 'HF']:.1f}x HF's "
                  f"cached generate (target >= 5x)."]
    if cli_rows:
        lines += ["", "`reformer-dist generate`, quickstart `tiny` config (random weights), 200 greedy tokens after "
                      "\"def main(\", default threads:", "", *cli_rows]
    text = "\n".join(lines)
    print("\n" + text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_generate.md").write_text(text + "\n")


if __name__ == "__main__":
    main()

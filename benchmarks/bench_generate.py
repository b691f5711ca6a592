"""Generation speed: cached vs uncached decoding, ours vs HF transformers' ``generate``, batch 1, CPU.

    .venv/bin/python benchmarks/bench_generate.py                       # prompts 1024 and 8192
    .venv/bin/python benchmarks/bench_generate.py --prompts 1024 --new-tokens 16

Model (random weights; speed does not depend on them): byte vocab 256, 6 layers all LSH, d_model 256,
4 heads x 64, d_ff 1024, chunk 64, 2 hashes, 128 buckets, hash_seed 0, axial (128, 128), fp32. One random
HF ``ReformerModelWithLMHead`` (transformers 4.57.6) is built and saved; ours are loaded from it:

- ``hf``           HF ``generate`` with ``use_cache=True`` (its bucket + hidden-state cache) and ``False``
- ``ours chunk``   ``from_hf`` (chunk windows): our fixed-shape version of HF's cached algorithm
- ``ours bucket``  the same weights with ``lsh_window="bucket"`` (strictly causal, per-bucket K/V rings)

Every token is time-stamped as it is produced (a streamer for HF, the token stream for ours). Prefill =
time to the first new token; cached tokens/s = (N - 1) / (time of token N - time of token 1); uncached
tokens/s = the same with the cache off (the whole sequence recomputed per token, ``--uncached-tokens`` of
them). Prints a markdown table (also written to benchmarks/results/bench_generate.md).
Targets: cached >= 10x uncached at 8K; ours cached >= HF cached.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch


def hf_model(max_len: int):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.ReformerConfig(
        vocab_size=256, hidden_size=256, num_attention_heads=4, attention_head_size=64, feed_forward_size=1024,
        attn_layers=["lsh"] * 6, lsh_attn_chunk_length=64, num_hashes=2, num_buckets=128, hash_seed=0,
        axial_pos_shape=[128, max_len // 128], axial_pos_embds_dim=[128, 128], max_position_embeddings=max_len,
        is_decoder=True, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, pad_token_id=0,
        eos_token_id=None)
    torch.manual_seed(0)
    return transformers.ReformerModelWithLMHead(config).eval()


def hf_times(model, prompt: torch.Tensor, n: int, use_cache: bool) -> list[float]:
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
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                       streamer=stamps, pad_token_id=0)
    return [t - start for t in stamps.times]


def ours_times(model, prompt: torch.Tensor, n: int, use_cache: bool) -> list[float]:
    """Seconds from the call to each new token: cached generation, or full recomputation per token."""
    from reformer_dist.model.generation import stream_generate

    times, start = [], time.perf_counter()
    if use_cache:
        for _ in stream_generate(model, prompt, n, temperature=0):
            times.append(time.perf_counter() - start)
        return times
    seq = prompt
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
            times.append(time.perf_counter() - start)
    return times


def rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", default="1024,8192", help="prompt lengths (comma-separated)")
    parser.add_argument("--new-tokens", type=int, default=33, help="tokens per cached run (default 33)")
    parser.add_argument("--uncached-tokens", type=int, default=3, help="tokens per uncached run (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results", help="directory for bench_generate.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = [int(p) for p in args.prompts.split(",")]
    max_len = max(16384, 128 * -(-(max(prompts) + args.new_tokens) // 128))

    from reformer_dist.model import ReformerLM
    from reformer_dist.model.hf_interop import from_hf

    hf = hf_model(max_len)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        chunk = from_hf(tmp)
    bucket = ReformerLM(dataclasses.replace(chunk.config, lsh_window="bucket")).eval()
    bucket.load_state_dict(chunk.state_dict())
    impls = {"HF generate (4.57.6)": (hf, hf_times), "ours, chunk window (HF algorithm)": (chunk, ours_times),
             "ours, bucket window": (bucket, ours_times)}

    rows = ["| prompt | implementation | prefill s | cached tok/s | uncached tok/s | cached / uncached |",
            "|---:|---|---:|---:|---:|---:|"]
    results = {}
    for length in prompts:
        prompt = torch.randint(2, 256, (1, length), generator=torch.Generator().manual_seed(length))
        for name, (model, timer) in impls.items():
            cached = timer(model, prompt, args.new_tokens, True)
            uncached = timer(model, prompt, args.uncached_tokens, False)
            results[length, name] = (rate(cached), rate(uncached))
            rows.append(f"| {length} | {name} | {cached[0]:.2f} | {rate(cached):.1f} | {rate(uncached):.2f} | "
                        f"{rate(cached) / rate(uncached):.0f}x |")
            print(rows[-1], flush=True)
    longest = max(prompts)
    hf_cached = results[longest, "HF generate (4.57.6)"][0]
    notes = [f"\n{args.threads} threads, {torch.__version__}, {args.new_tokens} cached / {args.uncached_tokens} "
             "uncached tokens per run. Targets at the longest prompt:"]
    for name in list(impls)[1:]:
        cached, uncached = results[longest, name]
        notes.append(f"- {name}: cached/uncached {cached / uncached:.0f}x (target >= 10x), "
                     f"cached vs HF cached {cached / hf_cached:.2f}x (target >= 1x)")
    table = "\n".join(rows + notes)
    print(table)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_generate.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

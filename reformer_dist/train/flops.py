"""FLOPs of a Reformer training step, for MFU (model FLOPs) and HFU (hardware FLOPs).

The usual ``6 * params`` rule is wrong for a Reformer twice over (see torchtitan#452, flame#7 for MFU
above 100% on non-Transformer models): attention cost depends on the window each query actually scores,
not on the sequence length, and reversible layers recompute their forward during the backward.

Counted, per token, as 2 FLOPs per multiply-accumulate of every matmul (LayerNorm, softmax, dropout and
the embeddings are noise next to them):

- projections: LSH shares query/key, so qk, v and output are 3 (d_model x inner) matmuls; local and full
  attention have q, k, v and output, 4 of them (inner = n_heads * d_head);
- LSH hashing: (d_head -> n_hashes * n_buckets/2) rotations per head;
- attention scores and values: 2 matmuls of d_head over the keys a query is scored against, per head
  and hash round. That is the window the kernels compute (masked slots included): LSH 'bucket' scores a
  chunk against itself and the previous chunk (2 * lsh_chunk_len keys), 'chunk' (1 + before + after)
  chunks, local attention (1 + before + after) * local_chunk_len, full attention seq_len;
- feed-forward: d_model -> d_ff -> d_model; LM head: 2*d_model -> vocab.

Model FLOPs of a step = 3 x forward (the backward costs two forwards). Hardware FLOPs add what is computed
again: every reversible layer's forward (without the hashing, whose buckets are cached) and the chunked
LM head + loss, which is checkpointed. Attention kernels that re-derive scores inside their own backward
(flash-style) do a little more still, which is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from reformer_dist.model import ReformerConfig


@dataclass(frozen=True)
class TokenFlops:
    """Forward FLOPs per token, split by what the backward recomputes."""

    layers: float
    """All reversible layers (attention + feed-forward), recomputed in the backward."""
    hashing: float
    """LSH hashing inside the layers (included in ``layers``), not recomputed: buckets are cached."""
    head: float
    """Final LM head (+ cross-entropy), recomputed in the backward (checkpointed chunks)."""

    @property
    def forward(self) -> float:
        return self.layers + self.head

    @property
    def model_per_token(self) -> float:
        """Training FLOPs per token by the model's arithmetic: forward + backward (= 2 forwards)."""
        return 3 * self.forward

    @property
    def hardware_per_token(self) -> float:
        """Training FLOPs per token actually executed, recomputation included."""
        return self.model_per_token + (self.layers - self.hashing) + self.head


def token_flops(cfg: ReformerConfig, seq_len: int) -> TokenFlops:
    d, inner = cfg.d_model, cfg.n_heads * cfg.d_head
    layers = hashing = 0.0
    for kind in cfg.layer_kinds():
        if kind == "lsh":
            windows = 2 if cfg.lsh_window == "bucket" else 1 + cfg.lsh_chunks_before + cfg.lsh_chunks_after
            keys = windows * cfg.lsh_chunk_len
            hash_flops = 2 * inner * cfg.lsh_n_hashes * sum(cfg.lsh_bucket_factors()) / 2
            attn = 3 * 2 * d * inner + hash_flops + cfg.lsh_n_hashes * 4 * inner * keys
            hashing += hash_flops
        else:
            keys = seq_len if kind == "full" else \
                (1 + cfg.local_chunks_before + cfg.local_chunks_after) * cfg.local_chunk_len
            attn = 4 * 2 * d * inner + 4 * inner * min(keys, seq_len)
        layers += attn + 2 * 2 * d * cfg.d_ff
    head = 2 * (2 * d) * cfg.vocab_size
    return TokenFlops(layers=layers, hashing=hashing, head=head)


# Dense peak TFLOP/s per GPU (no sparsity) by precision; the first name found in the device name wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def peak_flops(device_name: str | None, precision: str, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device at ``precision``: the config's override, a known GPU, or None."""
    if override_tflops is not None:
        return override_tflops * 1e12
    for name, peaks in PEAK_TFLOPS.items():
        if device_name and name in device_name and precision in peaks:
            return peaks[precision] * 1e12
    return None

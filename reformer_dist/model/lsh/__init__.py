"""LSH self-attention as one registered PyTorch op: ``torch.ops.reformer.lsh_attention``.

The algorithm is HF transformers' Reformer attention (ported from trax), reorganised for memory:

1. hash    ``bucket = argmax(cat[x R, -x R])`` per bucket factor, in fp32 (``hashing``);
2. sort    every (round, position) by (round, bucket, position), one stable sort (``layout``);
3. attend  in chunks of ``chunk_len`` over the sorted order (``forward``), one block of
           chunks at a time so the (chunks, c, window) score tensor never exists whole;
4. unsort  the per-round outputs and combine the rounds with logsumexp weights (``forward``).

A padded sequence that fits in one chunk (``L <= chunk_len``) is not hashed in the 'chunk' window: HF then
runs one plain causal shared-QK attention over it (one round, no wrap-around), and so does the op.

Queries are the shared projection ``qk`` itself; keys are ``qk`` normalised to unit length and divided
by sqrt(D) (HF: ``qk * rsqrt(mean(qk^2) + 1e-6) / sqrt(D)``, ``normalize_keys``).

Two windows over the sorted order:

- ``"chunk"`` (reference, HF/trax): a query sees its whole chunk plus ``chunks_before``/``chunks_after``
  neighbouring chunks, wrapping around across hash rounds, with the causal mask on original positions,
  padding keys masked, and the self-mask (a token sees itself only when nothing else is allowed).
  Causal masking forbids attending later keys, but later tokens still occupy sorted slots and move the
  chunk boundaries, so outputs depend (slightly) on the future.
- ``"bucket"`` (strictly causal): a query sees the at most ``chunk_len`` most recent earlier tokens of its
  own bucket in the same round (itself only via the self-mask), i.e. sorted keys with the same
  (round, bucket) and sorted index in ``[i - chunk_len, i]``. That set depends on tokens up to the query
  alone. (Non-causal models use ``[i - chunk_len, i + chunk_len]``.)

Buckets returned by the op are per round and *without* round offsets: (B, H, n_hashes, L) in
``[0, prod(n_buckets)]``, the last value being the padding bucket. Passing them back as ``buckets=``
reproduces the same sort (the reversible backward replays them).

Files, each read in a sitting: ``spec`` (``LshSpec``, the one description of a layer's hashing and window,
shared by the op, the kernels and the ONNX translation), ``hashing``, ``layout`` (sorted order, windows,
score blocks, dropout mask), ``forward`` (the reference), ``backward`` (its flash-style backward), ``ops``
(the registered ops and autograd), ``dispatch`` (kernels or reference), ``triton_kernels`` (the fused
Triton kernels, the ops' implementation on CUDA; imports Triton).
"""

from reformer_dist.model.lsh.forward import lsh_attention_reference
from reformer_dist.model.lsh.ops import lsh_attention, lsh_attention_backward, lsh_attention_with_stats
from reformer_dist.model.lsh.spec import WINDOWS, LshSpec, mask_values

__all__ = ["WINDOWS", "LshSpec", "lsh_attention", "lsh_attention_backward", "lsh_attention_reference",
           "lsh_attention_with_stats", "mask_values"]

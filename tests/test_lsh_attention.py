"""The LSH attention op: semantics against dense attention and HF, its manual backward, causality."""

from __future__ import annotations

import math

import pytest
import torch

from reformer_dist.model.lsh import forward, hashing, layout, spec
from reformer_dist.model.lsh.spec import LshSpec

lsh = torch.ops.reformer.lsh_attention


def dense_shared_qk(qk, v, causal, key_padding_mask=None):
    """Full shared-QK attention with HF's masks, written independently of the op."""
    length, d = qk.shape[-2:]
    k = qk / torch.sqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(d)
    scores = qk @ k.transpose(-1, -2)
    allowed = torch.ones(length, length, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, -1e9)
    scores = scores.masked_fill(torch.eye(length, dtype=torch.bool), -1e5)  # self only if nothing else
    return torch.softmax(scores, -1) @ v


def inputs(b=2, h=3, length=32, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(b, h, length, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, length, d, generator=g, dtype=dtype)
    return qk, v


def rotations(h=3, d=8, n_hashes=2, n_buckets=(4,), seed=1):
    return torch.randn(h, d, n_hashes, sum(n_buckets) // 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_hashes", [1, 2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_chunk_window_covering_sequence_equals_full_shared_qk_attention(n_hashes, causal):
    qk, v = inputs()
    for seed in range(3):  # whatever the rotations
        out, _ = lsh(qk, v, rotations(n_hashes=n_hashes, seed=seed), None, None, n_hashes, [4], 32, 1, 0, "chunk", causal,
                     0.0, 0)
        torch.testing.assert_close(out, dense_shared_qk(qk, v, causal), atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_hashes", [1, 2])
def test_bucket_window_one_bucket_covering_sequence_equals_full_attention(n_hashes):
    qk, v = inputs()
    expected = dense_shared_qk(qk, v, causal=True)
    # zero rotations hash every token to bucket 0
    out, buckets = lsh(qk, v, torch.zeros(3, 8, n_hashes, 2), None, None, n_hashes, [4], 32, 0, 0, "bucket", True, 0.0, 0)
    assert int(buckets.max()) == 0
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the same through explicit buckets, with several chunks: a window of 32 covers everything
    same = torch.zeros(2, 3, n_hashes, 32, dtype=torch.long)
    out, _ = lsh(qk, v, rotations(n_hashes=n_hashes), None, same, n_hashes, [4], 32, 0, 0, "bucket", True, 0.0, 0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_bucket_window_sees_only_the_last_chunk_len_tokens_of_its_bucket():
    qk, v = inputs(b=1, h=1, length=16)
    one_bucket = torch.zeros(1, 1, 1, 16, dtype=torch.long)
    out, _ = lsh(qk, v, rotations(h=1, n_hashes=1), None, one_bucket, 1, [4], 4, 0, 0, "bucket", True, 0.0, 0)
    # with a single bucket, query t sees keys t-4..t: a banded dense attention
    length, d = 16, 8
    k = qk / torch.sqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(d)
    scores = qk @ k.transpose(-1, -2)
    i = torch.arange(length)
    band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= 4)
    scores = scores.masked_fill(~band, -1e9).masked_fill(torch.eye(length, dtype=torch.bool), -1e5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hf_lsh_self_attention_parity(dtype):
    """Same weights, same rotations (hash_seed) => same outputs and buckets as HF 4.57.6, padded or not.

    fp64 agrees to rounding. In fp32 HF loses ~4e-3 on rows that only see themselves (it takes
    ``exp(s - logsumexp)`` with both near the -1e5 self-mask constant), hence the looser tolerance there.
    """
    from transformers import ReformerConfig as HFConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention as HFLSH

    cfg = HFConfig(hidden_size=32, num_attention_heads=2, attention_head_size=16, num_hashes=2, num_buckets=[4, 2],
                   lsh_attn_chunk_length=8, lsh_num_chunks_before=1, lsh_num_chunks_after=0, is_decoder=True,
                   hash_seed=7, lsh_attention_probs_dropout_prob=0.0, attn_layers=["lsh"], max_position_embeddings=64)
    torch.manual_seed(0)
    hf = HFLSH(cfg).eval().to(dtype)
    hidden = torch.randn(2, 32, 32, dtype=dtype)
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 21:] = 0
    tol = 1e-9 if dtype == torch.float64 else 5e-3
    for attention_mask in (None, mask):
        ref = hf(hidden, attention_mask=attention_mask)
        qk = hidden @ hf.query_key.weight.T
        v = hidden @ hf.value.weight.T
        split = lambda x: x.view(2, 32, 2, 16).transpose(1, 2)  # noqa: E731
        rot = torch.randn(2, 16, 2, 3, generator=torch.Generator().manual_seed(7), dtype=dtype)
        kpm = None if attention_mask is None else attention_mask.bool()
        out, buckets = lsh(split(qk), split(v), rot, kpm, None, 2, [4, 2], 8, 1, 0, "chunk", True, 0.0, 0)
        out = out.transpose(1, 2).reshape(2, 32, 32)
        real = torch.ones(2, 32, dtype=torch.bool) if kpm is None else kpm
        torch.testing.assert_close(out[real], ref.hidden_states[real], atol=tol, rtol=0)
        n_offset = 8 + (attention_mask is not None)  # HF offsets rounds by n_buckets (+1 with padding)
        hf_buckets = ref.buckets - torch.arange(2).view(1, 1, 2, 1) * n_offset
        assert torch.equal(buckets, hf_buckets)


@pytest.mark.parametrize("window", ["chunk", "bucket"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_manual_backward_matches_autograd_through_reference_fp64(window, dropout_p, monkeypatch):
    monkeypatch.setattr(layout, "BLOCK_SCORES", 1)  # one chunk per block: exercises cross-block accumulation
    qk, v = inputs(length=24, dtype=torch.float64)
    qk.requires_grad_()
    v.requires_grad_()
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False
    rot = rotations(n_hashes=2, n_buckets=(4, 2))
    out, buckets = lsh(qk, v, rot, mask, None, 2, [4, 2], 4, 1, 0, window, True, dropout_p, 1234)
    ref, ref_buckets = forward.lsh_attention_reference(qk, v, rot, mask, None, LshSpec(2, (4, 2), 4, 1, 0, window, True),
                                                       dropout_p, 1234)
    assert torch.equal(buckets, ref_buckets)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(ref, (qk, v), grad, retain_graph=True)
    # both the public op (statistics recomputed in the backward) and the training variant (passed on)
    with_stats, _, _ = torch.ops.reformer.lsh_attention_with_stats(qk, v, rot, mask, None, 2, [4, 2], 4, 1, 0, window,
                                                                   True, dropout_p, 1234)
    for result in (out, with_stats):
        for g, w in zip(torch.autograd.grad(result, (qk, v), grad), want):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("window", "dropout_p"), [("chunk", 0.0), ("bucket", 0.0), ("chunk", 0.2)])
def test_op_gradcheck_with_fixed_buckets(window, dropout_p):
    qk, v = inputs(b=1, h=2, length=16, d=4, dtype=torch.float64)
    qk.requires_grad_()
    v.requires_grad_()
    rot = rotations(h=2, d=4, n_hashes=2)
    _, buckets = lsh(qk, v, rot, None, None, 2, [4], 4, 1, 0, "chunk", True, 0.0, 0)

    def attention(a, b):
        return lsh(a, b, rot, None, buckets, 2, [4], 4, 1, 0, window, True, dropout_p, 5)[0]

    assert torch.autograd.gradcheck(attention, (qk, v), eps=1e-6, atol=1e-7, fast_mode=True)


def test_op_registration_passes_opcheck():
    qk, v = inputs(b=1, h=2, length=16, d=4)
    qk.requires_grad_()
    v.requires_grad_()
    _, buckets = lsh(qk, v, rotations(h=2, d=4), None, None, 2, [4], 4, 1, 0, "chunk", True, 0.0, 0)
    args = (qk, v, rotations(h=2, d=4), None, buckets, 2, [4], 4, 1, 0, "bucket", True, 0.0, 0)
    torch.library.opcheck(lsh, args)
    torch.library.opcheck(torch.ops.reformer.lsh_attention_with_stats, args)


def test_output_does_not_depend_on_block_size(monkeypatch):
    qk, v = inputs(length=64)
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[0, 50:] = False
    rot = rotations(n_hashes=3, n_buckets=(4, 4))
    for window in ("chunk", "bucket"):
        big, b1 = lsh(qk, v, rot, mask, None, 3, [4, 4], 8, 1, 0, window, True, 0.1, 3)
        monkeypatch.setattr(layout, "BLOCK_SCORES", 1)
        monkeypatch.setattr(hashing, "HASH_BLOCK_ELEMENTS", 1)  # one position per hashing block
        small, b2 = lsh(qk, v, rot, mask, None, 3, [4, 4], 8, 1, 0, window, True, 0.1, 3)
        monkeypatch.undo()
        assert torch.equal(b1, b2)
        torch.testing.assert_close(big, small, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n_buckets", [[2], [64], [16, 8], [4, 4, 2]])
def test_large_input_buckets_are_the_argmax_of_the_sign_doubled_rotations_ties_included(n_buckets, monkeypatch):
    monkeypatch.setattr(hashing, "DOUBLED_ARGMAX_ELEMENTS", 0)  # the amax/amin path at every size
    g = torch.Generator().manual_seed(0)
    rotated = torch.randn(2, 3, 400, sum(n_buckets) // 2, generator=g)
    rotated[0, 0, :50] = 0.0  # all-zero rows: bucket 0
    rotated[0, 1] = rotated[0, 1].round()  # ties everywhere, within and across the halves
    rotated[1, 0] = rotated[1, 0].abs().round()
    expected, offset, stride = 0, 0, 1
    for factor in n_buckets:
        part = rotated[..., offset : offset + factor // 2]
        expected = expected + stride * torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
        offset, stride = offset + factor // 2, stride * factor
    assert torch.equal(hashing.rotated_buckets(rotated, n_buckets), expected)


def test_replaying_returned_buckets_reproduces_the_output():
    qk, v = inputs(length=32)
    out, buckets = lsh(qk, v, rotations(), None, None, 2, [4], 8, 1, 0, "chunk", True, 0.0, 0)
    again, same = lsh(qk, v, rotations(seed=99), None, buckets, 2, [4], 8, 1, 0, "chunk", True, 0.0, 0)
    assert torch.equal(out, again) and torch.equal(buckets, same)


def test_bucket_window_is_strictly_causal():
    qk, v = inputs(length=64)
    rot = rotations(n_hashes=2, n_buckets=(4, 2))
    out, _ = lsh(qk, v, rot, None, None, 2, [4, 2], 8, 0, 0, "bucket", True, 0.0, 0)
    t = 40
    qk2, v2 = qk.clone(), v.clone()
    qk2[:, :, t + 1 :] = torch.randn_like(qk2[:, :, t + 1 :])
    v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :])
    out2, _ = lsh(qk2, v2, rot, None, None, 2, [4, 2], 8, 0, 0, "bucket", True, 0.0, 0)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1], atol=1e-6, rtol=0)


def test_chunk_window_puts_no_weight_on_later_positions_but_leaks_through_sorting():
    qk, v = inputs(length=64)
    qk.requires_grad_()
    v.requires_grad_()
    rot = rotations(n_hashes=2, n_buckets=(4, 2))
    out, _ = lsh(qk, v, rot, None, None, 2, [4, 2], 8, 1, 0, "chunk", True, 0.0, 0)
    t = 40
    out[:, :, : t + 1].sum().backward()
    assert v.grad[:, :, t + 1 :].abs().max() == 0  # no attention weight on a later value
    assert qk.grad[:, :, t + 1 :].abs().max() == 0  # nor on a later key
    # ... yet later tokens move the chunk boundaries of the sorted order
    qk2, v2 = qk.detach().clone(), v.detach().clone()
    qk2[:, :, t + 1 :] = torch.randn_like(qk2[:, :, t + 1 :])
    out2, _ = lsh(qk2, v2, rot, None, None, 2, [4, 2], 8, 1, 0, "chunk", True, 0.0, 0)
    leak = (out.detach()[:, :, : t + 1] - out2[:, :, : t + 1]).abs().max().item()
    print(f"chunk-window leak at the op (L=64, chunk 8, 2 hashes): max |d out[<= {t}]| = {leak:.3g}")
    assert leak > 1e-3


def test_half_precision_stays_finite_and_close():
    qk, v = inputs(length=64)
    rot = rotations(n_hashes=2, n_buckets=(4, 2))
    ref, buckets = lsh(qk, v, rot, None, None, 2, [4, 2], 8, 1, 0, "bucket", True, 0.0, 0)
    for dtype in (torch.bfloat16, torch.float16):
        out, _ = lsh(qk.to(dtype), v.to(dtype), rot, None, buckets, 2, [4, 2], 8, 1, 0, "bucket", True, 0.0, 0)
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_bucket_window_compute_chunking_does_not_change_the_result(monkeypatch):
    """'bucket' is defined by its reach; computing it with half-size query chunks is an implementation detail."""
    qk, v = inputs(length=64)
    qk.requires_grad_()
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 45:] = False
    rot = rotations(n_hashes=2, n_buckets=(4, 2))
    results = []
    for split in (1, 2, 4):
        monkeypatch.setattr(spec, "BUCKET_SPLIT", split)
        out, _, _ = torch.ops.reformer.lsh_attention_with_stats(qk, v, rot, mask, None, 2, [4, 2], 8, 0, 0, "bucket",
                                                                True, 0.0, 0)
        results.append((out, torch.autograd.grad(out.sum(), qk)[0]))
    for out, grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-5, rtol=0)

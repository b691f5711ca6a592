"""The registered ops: ``torch.ops.reformer.lsh_attention``, ``lsh_attention_with_stats`` and their
flash-style backward ``lsh_attention_backward``, with fake implementations and autograd.

Each call runs the fused Triton kernels where they apply (``dispatch.use_kernels``: CUDA, or CPU under
``TRITON_INTERPRET=1``) and the PyTorch reference (``forward``/``backward``) otherwise. The schema spells
the ``LshSpec`` out as plain arguments (``LshSpec.op_args``): torch.library ops take no dataclasses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reformer_dist.model.lsh.backward import lsh_attention_backward_reference
from reformer_dist.model.lsh.dispatch import use_kernels
from reformer_dist.model.lsh.forward import lsh_attention_forward
from reformer_dist.model.lsh.layout import as_rows, from_rows, heads_inner
from reformer_dist.model.lsh.spec import LshSpec, acc_dtype

# (qk, v, rotations, key_padding_mask, buckets, *spec, dropout_p, dropout_seed[, head_offset, n_heads_total]);
# the last two (defaults: the input's own heads) only matter for attention dropout under sequence parallelism.
_SPEC_ARGS = "int n_hashes, int[] n_buckets, int chunk_len, int chunks_before, int chunks_after, str window, bool causal"
_CALL_ARGS = "float dropout_p, int dropout_seed, int head_offset=0, int n_heads_total=0"
_FORWARD_ARGS = (f"(Tensor qk, Tensor v, Tensor rotations, Tensor? key_padding_mask, Tensor? buckets, {_SPEC_ARGS}, "
                 f"{_CALL_ARGS})")
_N_SPEC = 7


def _in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """A kernel's contiguous (B, H, L, D) result in the layout the reference returns for ``like``."""
    inner = heads_inner(like)
    return from_rows(as_rows(t, inner), tuple(t.shape), inner) if inner else t


def _run_forward(qk, v, rotations, key_padding_mask, buckets, *args):
    spec, (dropout_p, dropout_seed, *heads) = LshSpec(*args[:_N_SPEC]), args[_N_SPEC:]
    with torch.no_grad(), torch.autocast(qk.device.type, enabled=False):
        if use_kernels(qk, v, spec, dropout_p, *heads):
            from reformer_dist.model.lsh.triton_kernels import lsh_attention_triton_with_stats

            out, used, stats = lsh_attention_triton_with_stats(qk, v, rotations, key_padding_mask, buckets, spec,
                                                               dropout_p, dropout_seed, inner=heads_inner(v))
            out = _in_layout_of(out, v)
        else:
            out, used, stats = lsh_attention_forward(qk, v, rotations, key_padding_mask, buckets, spec, dropout_p,
                                                     dropout_seed, *heads)
    return out.to(v.dtype), used.clone() if buckets is not None else used, stats


def _fake_forward(qk, v, n_hashes):
    b, h, length, d = qk.shape
    out = from_rows(v.new_empty(b * h * length, d), tuple(v.shape), heads_inner(v))
    stats = qk.new_empty((2, n_hashes, b * h * length), dtype=acc_dtype(qk.dtype))
    return out, qk.new_empty((b, h, n_hashes, length), dtype=torch.long), stats


def _backward_impl(grad_out, qk, v, out, buckets, key_padding_mask, stats, *args):
    """(grad_qk, grad_v) of the forward; ``stats`` from ``lsh_attention_with_stats`` or None to recompute."""
    spec, (dropout_p, dropout_seed, *heads) = LshSpec(*args[:_N_SPEC]), args[_N_SPEC:]
    with torch.no_grad(), torch.autocast(qk.device.type, enabled=False):
        if use_kernels(qk, v, spec, dropout_p, *heads):
            from reformer_dist.model.lsh.triton_kernels import lsh_attention_backward_triton

            grad_qk, grad_v = lsh_attention_backward_triton(grad_out, qk, v, out, buckets, key_padding_mask, spec,
                                                            dropout_p, dropout_seed)
            return _in_layout_of(grad_qk, qk), _in_layout_of(grad_v, v)
        return lsh_attention_backward_reference(grad_out, qk, v, out, buckets, key_padding_mask, stats, spec,
                                                dropout_p, dropout_seed, *heads)


def _fake_backward(grad_out, qk, v, *_):
    inner, rows = heads_inner(v), qk.shape[0] * qk.shape[1] * qk.shape[2]
    return (from_rows(qk.new_empty(rows, qk.shape[-1]), tuple(qk.shape), inner),
            from_rows(v.new_empty(rows, v.shape[-1]), tuple(v.shape), inner))


lsh_attention_backward = torch.library.custom_op(
    "reformer::lsh_attention_backward", _backward_impl, mutates_args=(),
    schema=(f"(Tensor grad_out, Tensor qk, Tensor v, Tensor out, Tensor buckets, Tensor? key_padding_mask, "
            f"Tensor? stats, {_SPEC_ARGS}, {_CALL_ARGS}) -> (Tensor, Tensor)"))
lsh_attention_backward.register_fake(_fake_backward)


def _setup_context(ctx, inputs, output):
    qk, v, _rotations, key_padding_mask, _buckets, *args = inputs
    out, buckets, *stats = output
    ctx.save_for_backward(qk, v, out, buckets, key_padding_mask, stats[0] if stats else None)
    ctx.args = args


def _autograd_backward(ctx, grad_out, *_unused_grads):
    qk, v, out, buckets, key_padding_mask, stats = ctx.saved_tensors
    grad_qk, grad_v = torch.ops.reformer.lsh_attention_backward(grad_out, qk, v, out, buckets, key_padding_mask,
                                                                stats, *ctx.args)
    return grad_qk, grad_v, *([None] * (3 + len(ctx.args)))


def _forward_op(name: str, n_outputs: int):
    """Register ``reformer::<name>``: the forward returning its first ``n_outputs`` of (out, buckets,
    stats), with its fake implementation and the flash-style backward."""

    def forward(*args):
        return _run_forward(*args)[:n_outputs]

    op = torch.library.custom_op(f"reformer::{name}", forward, mutates_args=(),
                                 schema=f"{_FORWARD_ARGS} -> ({', '.join(['Tensor'] * n_outputs)})")
    op.register_fake(lambda qk, v, rotations, mask, buckets, n_hashes, *_: _fake_forward(qk, v, n_hashes)[:n_outputs])
    op.register_autograd(_autograd_backward, setup_context=_setup_context)
    return op


# LSH self-attention (see the package docstring): (out (B, H, L, D) in v's dtype, buckets (B, H, n, L)).
lsh_attention = _forward_op("lsh_attention", 2)
# ``lsh_attention`` that also returns the softmax statistics (2, n_hashes, B*H*L) its backward needs, so the
# backward skips recomputing them (one of its two passes). The model uses it when training; inference and
# export use ``lsh_attention``.
lsh_attention_with_stats = _forward_op("lsh_attention_with_stats", 3)

"""An ONNX Runtime kernel for ``reformer::LshAttention``: the override path of the node's body.

ONNX Runtime prefers a registered kernel over a node's function body, so with this kernel the
exported graph runs the PyTorch op (``torch.ops.reformer.lsh_attention``) for each LSH layer instead of
the standard-op body. It is an onnxruntime-extensions Python op (``@onnx_op``, CPU, fp32, under the
GIL): a debugging and cross-checking path, and the template for a compiled custom-op library.

onnxruntime-extensions Python ops read only int/float/string attributes, so the node's ``n_buckets``
(a list) cannot reach the kernel: :func:`register_lsh_kernel` takes it from the model being loaded.
Python ops are registered process-wide; the bucket factors are those of the last model registered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reformer_dist.export.lsh_onnx import DOMAIN, OP_TYPE


@dataclass
class _KernelState:
    n_buckets: tuple[int, ...] = ()
    calls: int = 0
    registered: bool = False


STATE = _KernelState()


def register_lsh_kernel(n_buckets: tuple[int, ...]) -> str:
    """Register the Python kernel (once per process) for models with these bucket factors.

    Returns the onnxruntime-extensions library path to pass to ``SessionOptions.register_custom_ops_library``.
    """
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    STATE.n_buckets = tuple(n_buckets)
    if not STATE.registered:
        dt = PyCustomOpDef
        onnx_op(op_type=f"{DOMAIN}::{OP_TYPE}",
                inputs=[dt.dt_float, dt.dt_float, dt.dt_float, dt.dt_bool],
                outputs=[dt.dt_float, dt.dt_int64],
                attrs={"window": dt.dt_string, "chunk_len": dt.dt_int64, "chunks_before": dt.dt_int64,
                       "chunks_after": dt.dt_int64, "causal": dt.dt_int64})(_lsh_attention_kernel)
        STATE.registered = True
    return get_library_path()


def _lsh_attention_kernel(qk: np.ndarray, v: np.ndarray, rotations: np.ndarray, key_padding_mask: np.ndarray,
                          window: str, chunk_len: int, chunks_before: int, chunks_after: int,
                          causal: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    import reformer_dist.model.lsh_attention  # noqa: F401  (registers the op)

    STATE.calls += 1
    with torch.no_grad():
        out, buckets = torch.ops.reformer.lsh_attention(
            torch.from_numpy(qk), torch.from_numpy(v), torch.from_numpy(rotations), torch.from_numpy(key_padding_mask),
            None, list(STATE.n_buckets), chunk_len, chunks_before, chunks_after, window, bool(causal), 0.0, 0)
    return out.numpy(), buckets.numpy()

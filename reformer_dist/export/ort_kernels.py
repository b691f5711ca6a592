"""An ONNX Runtime kernel for ``reformer::LshAttention``: the override path of the node's body.

ONNX Runtime prefers a registered kernel over a node's function body, so with this kernel the
exported graph runs the PyTorch op (``torch.ops.reformer.lsh_attention``) for each LSH layer instead of
the standard-op body. It is an onnxruntime-extensions Python op (``@onnx_op``, CPU, fp32, under the
GIL): a debugging and cross-checking path, and the template for a compiled custom-op library.

Each node's ``LshSpec`` reaches the kernel through the node's own attributes. onnxruntime-extensions
Python ops read only int/float/string attributes, and the node's ``n_buckets`` is a list, so
:func:`kernel_model` adds the whole spec as one string attribute, ``spec`` (JSON of
``LshSpec.attributes``), to every LshAttention node of the model the session loads.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import onnx

from reformer_dist.export.lsh_onnx import DOMAIN, OP_TYPE, LshNode

SPEC_ATTRIBUTE = "spec"


@functools.cache
def register_lsh_kernel() -> str:
    """Register the Python kernel (once per process: onnxruntime-extensions ops are process-wide).

    Returns the onnxruntime-extensions library path to pass to ``SessionOptions.register_custom_ops_library``.
    """
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    dt = PyCustomOpDef
    onnx_op(op_type=f"{DOMAIN}::{OP_TYPE}", inputs=[dt.dt_float, dt.dt_float, dt.dt_float, dt.dt_bool],
            outputs=[dt.dt_float, dt.dt_int64], attrs={SPEC_ATTRIBUTE: dt.dt_string})(_lsh_attention_kernel)
    return get_library_path()


def kernel_model(path: str | os.PathLike) -> bytes:
    """The model at ``path`` with each LshAttention node's spec also as the string attribute the kernel
    reads; raises ValueError when the graph has no such node."""
    proto = onnx.load(path)
    nodes = [n for n in proto.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]
    if not nodes:
        raise ValueError(f"{path}: the graph has no {DOMAIN}::{OP_TYPE} node to run with the kernel")
    for node in nodes:
        spec = LshNode.from_node(node).spec
        node.attribute.append(onnx.helper.make_attribute(SPEC_ATTRIBUTE, json.dumps(spec.attributes())))
    return proto.SerializeToString()


def _lsh_attention_kernel(qk: np.ndarray, v: np.ndarray, rotations: np.ndarray, key_padding_mask: np.ndarray,
                          spec: str) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from reformer_dist.model.lsh import LshSpec  # importing the package registers the op

    lsh = LshSpec.from_attributes(json.loads(spec))
    with torch.no_grad():
        out, buckets = torch.ops.reformer.lsh_attention(
            torch.from_numpy(qk), torch.from_numpy(v), torch.from_numpy(rotations), torch.from_numpy(key_padding_mask),
            None, *lsh.op_args(), 0.0, 0)
    return out.numpy(), buckets.numpy()

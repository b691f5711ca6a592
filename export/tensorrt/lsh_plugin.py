"""TensorRT Quickly-Deployable Plugin (QDP) for the ``reformer::LshAttention`` ONNX node.

Importing this file registers the plugin ``reformer::LshAttention`` (version "1") in TensorRT's plugin
registry. An engine built from the ``tensorrt`` export flavour (nodes carrying ``plugin_namespace``)
then runs each LSH layer through :func:`lsh_attention_impl` instead of the standard-op body (TensorRT
>= 10.7 prefers a registered plugin over a node's local function).

The implementation is JIT: a Python callback on TensorRT's stream that calls the PyTorch op
``torch.ops.reformer.lsh_attention`` (which runs the fused Triton kernels on CUDA where they apply). An
engine using it needs this file imported in the process that runs it (``reformer_dist.export
.tensorrt_build.TensorRTRunner`` does that). For engines without Python (trtexec, Triton server's
TensorRT backend) build from the ``portable`` flavour: its counting-sort body parses into plain
TensorRT layers. An AOT (``@trtp.aot_impl``) variant needs the whole hash -> sort -> attend -> combine
pipeline in ONE kernel launch without workspace (the QDP AOT contract); that is not done yet.

Requires TensorRT >= 10.9 (QDP stable), torch with CUDA, and ``reformer_dist`` importable.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import tensorrt as trt
import tensorrt.plugin as trtp

PLUGIN_ID = "reformer::LshAttention"


@trtp.register(PLUGIN_ID)
def lsh_attention_desc(qk: trtp.TensorDesc, v: trtp.TensorDesc, rotations: trtp.TensorDesc,
                       key_padding_mask: trtp.TensorDesc, window: str, chunk_len: int, chunks_before: int,
                       chunks_after: int, n_hashes: int, n_buckets: npt.NDArray[np.int64],
                       causal: int) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
    """out (B, H, L, D) like v; buckets (B, H, n_hashes, L) int64."""
    b, h, length = qk.shape_expr[0], qk.shape_expr[1], qk.shape_expr[2]
    return v.like(), trtp.from_shape_expr((b, h, n_hashes, length), dtype=trt.int64)


@trtp.autotune(PLUGIN_ID)
def lsh_attention_autotune(qk, v, rotations, key_padding_mask, outputs) -> list[trtp.AutoTuneCombination]:
    # qk, v and out share fp32|fp16|bf16; rotations stay fp32, the mask bool, buckets int64
    return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32, BOOL, FP32|FP16|BF16, INT64")]


@trtp.impl(PLUGIN_ID)
def lsh_attention_impl(qk: trtp.Tensor, v: trtp.Tensor, rotations: trtp.Tensor, key_padding_mask: trtp.Tensor,
                       window: str, chunk_len: int, chunks_before: int, chunks_after: int, n_hashes: int,
                       n_buckets: npt.NDArray[np.int64], causal: int, outputs: tuple[trtp.Tensor, ...],
                       stream: int) -> None:
    import torch

    from reformer_dist.model.lsh import (
        LshSpec,  # importing the package registers torch.ops.reformer.lsh_attention
    )

    def view(t: trtp.Tensor) -> torch.Tensor:  # zero-copy
        return torch.as_tensor(t, device="cuda")

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)), torch.no_grad():
        spec = LshSpec(n_hashes, tuple(int(f) for f in n_buckets), chunk_len, chunks_before, chunks_after, window,
                       bool(causal))
        out, buckets = torch.ops.reformer.lsh_attention(
            view(qk), view(v), view(rotations), view(key_padding_mask), None, *spec.op_args(), 0.0, 0)
        view(outputs[0]).copy_(out)
        view(outputs[1]).copy_(buckets)

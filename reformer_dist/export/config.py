"""The ``export:`` section of a run config (also the defaults of ``reformer-dist export onnx``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    precision: str = "fp32"
    """fp32 or fp16 weights/activations in the exported graph (LSH hashing always runs in fp32)."""
    flavour: str = "portable"
    """portable (standard-op LSH body), tensorrt (plugin attributes) or ort-tensorrt (trt.plugins domain)."""
    opset: int = 18
    """ONNX opset of the exported graph (the LSH body is written for the same opset)."""
    lsh_sort: str = "counting"
    """Sort inside the LSH body: 'counting' (one-hot + CumSum; TensorRT parses it; memory
    B*H*n_hashes*L*n_buckets fp32) or 'topk' (TopK; fewer ops, but TensorRT rejects K >= 3840)."""

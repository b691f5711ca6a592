"""The ``export:`` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExportConfig:
    precision: str = "fp32"
    """fp32 or fp16 weights/activations in the exported graph."""
    flavour: str = "portable"
    """portable (standard-op LSH body), tensorrt (plugin attributes) or ort-tensorrt (trt.plugins domain)."""
    opset: int = 18
    """ONNX opset of the exported graph."""

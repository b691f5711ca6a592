"""The ``export:`` section of a run config (also the defaults of ``reformer-dist export onnx``)."""

from __future__ import annotations

from dataclasses import dataclass

from reformer_dist.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "int8")
FLAVOURS = ("portable", "tensorrt", "ort-tensorrt")
LSH_SORTS = ("counting", "topk")


@dataclass
class ExportConfig:
    precision: str = "fp32"
    """fp32 or fp16 weights/activations in the exported graph (LSH hashing always runs in fp32), or int8:
    an fp32 graph whose linear layers ONNX Runtime's quantize_dynamic turned int8 (ONNX Runtime only)."""
    flavour: str = "portable"
    """portable (standard-op LSH body), tensorrt (plugin attributes) or ort-tensorrt (trt.plugins domain)."""
    opset: int = 18
    """ONNX opset of the exported graph (the LSH body is written for the same opset)."""
    lsh_sort: str = "counting"
    """Sort inside the LSH body: 'counting' (radix passes of one-hot + CumSum over digits of at most 32
    values; TensorRT parses it) or 'topk' (TopK; fewer ops, but TensorRT rejects K >= 3840)."""

    def validate(self, prefix: str = "export") -> ExportConfig:
        """Check every field; raise ConfigError naming the first bad one. Returns self."""
        for name, allowed in (("precision", PRECISIONS), ("flavour", FLAVOURS), ("lsh_sort", LSH_SORTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{prefix}.{name}", f"must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.precision == "int8" and self.flavour != "portable":
            raise ConfigError(f"{prefix}.precision", f"int8 graphs are for ONNX Runtime: use flavour 'portable', "
                                                     f"not {self.flavour!r}")
        if not 18 <= self.opset <= 24:  # the exporter's range; TensorRT's parser takes 9-24
            raise ConfigError(f"{prefix}.opset", f"must be in [18, 24], got {self.opset}")
        return self

"""The Reformer model core (PyTorch only: no DeepSpeed, ONNX or serving here)."""

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.reformer import ReformerLM

__all__ = ["ReformerConfig", "ReformerLM"]

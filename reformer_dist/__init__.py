"""reformer-dist: train Reformer language models with DeepSpeed, deploy them with ONNX Runtime / TensorRT.

``ReformerConfig`` and ``ReformerLM`` are imported lazily so ``import reformer_dist`` (and the CLI's
``--help``) does not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reformer_dist.model.config import ReformerConfig
    from reformer_dist.model.reformer import ReformerLM

__all__ = ["ReformerConfig", "ReformerLM"]


def __getattr__(name: str) -> Any:
    if name == "ReformerConfig":
        from reformer_dist.model.config import ReformerConfig

        return ReformerConfig
    if name == "ReformerLM":
        from reformer_dist.model.reformer import ReformerLM

        return ReformerLM
    raise AttributeError(f"module 'reformer_dist' has no attribute {name!r}")

"""Run an exported Reformer graph with ONNX Runtime.

    runner = OrtRunner("model.onnx")            # providers: TensorRT > CUDA > CPU, whichever is installed
    logits = runner.logits(input_ids)           # (B, L) int64 -> (B, L, vocab) float32

The session is configured from what the export recorded in ``metadata_props`` (``runner.metadata``:
config, tokenizer, max_seq_len, flavour...). Inputs and outputs go through IO binding, so on a GPU
provider the logits are produced on the device and copied to the host once.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from reformer_dist.artifacts.tokenizer_spec import metadata_spec
from reformer_dist.errors import ReformerDistError

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "layout", "all")


def select_providers(requested: list[str] | None = None) -> list[str]:
    """``requested`` (checked against what is installed) or every installed one in preference order."""
    import onnxruntime as ort

    installed = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in installed]
        if missing:
            raise ReformerDistError(f"execution provider(s) {missing} not available; installed: {installed}")
        return list(requested)
    return [p for p in PROVIDER_PREFERENCE if p in installed]


def session_options(optimization: str = "all", threads: int = 0):
    """``onnxruntime.SessionOptions`` at an optimisation level ('disable' .. 'all') and intra-op threads."""
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ReformerDistError(f"optimization must be one of {OPTIMIZATION_LEVELS}, got {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    return options


# ONNX Runtime's CPU SkipLayerNormalization kernel is 4-7x slower than the Add + LayerNormalization it
# fuses (ORT 1.32, measured at d_model 32-256 and 4K-16K rows, 1 and 2 threads: e.g. 2.6 ms vs 0.38 ms at
# d 128, 4K rows, 1 thread; the 4K prefill of the serving benchmark's model: 9.7 -> 8.9 ms). On CPU the
# fusion is left off.
CPU_SLOW_FUSIONS = ["SkipLayerNormFusion"]


def cpu_disabled_fusions(providers: list[str]) -> list[str]:
    """Graph fusions to turn off for a session whose first provider is ``providers[0]``."""
    return CPU_SLOW_FUSIONS if providers[0] == "CPUExecutionProvider" else []


def create_session(path: str | os.PathLike, providers: list[str] | None = None, optimization: str = "all",
                   optimized_model_path: str | os.PathLike | None = None, threads: int = 0,
                   custom_ops_library: str | None = None, model_bytes: bytes | None = None):
    """An ``onnxruntime.InferenceSession`` over ``path`` (arguments as :class:`OrtRunner`'s), or over
    ``model_bytes`` when given (a rewritten copy of the model at ``path``)."""
    import onnxruntime as ort

    options = session_options(optimization, threads)
    if not os.path.isfile(path):
        raise ReformerDistError(f"{path}: no such ONNX model")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if custom_ops_library is not None:
        options.register_custom_ops_library(custom_ops_library)
    providers = select_providers(providers)
    try:
        return ort.InferenceSession(str(path) if model_bytes is None else model_bytes, options,
                                    providers=providers, disabled_optimizers=cpu_disabled_fusions(providers))
    except Exception as e:  # ORT raises its own exception types for malformed models
        raise ReformerDistError(f"{path}: ONNX Runtime cannot load the model: {e}") from None


def output_device(session) -> str:
    """Where IO binding should leave outputs: the first provider's device."""
    return "cpu" if session.get_providers()[0] == "CPUExecutionProvider" else "cuda"


class OrtRunner:
    """An ONNX Runtime session over an exported logits graph (see module doc).

    providers: names, default all installed ones in :data:`PROVIDER_PREFERENCE` order.
    optimization: graph optimisation level ('disable' .. 'all'). optimized_model_path: also write the
    optimised graph there (levels above 'extended' are hardware-specific). threads: intra-op threads
    (0 = ONNX Runtime's default). lsh_kernel: run LSH layers with the PyTorch op through an
    onnxruntime-extensions Python kernel instead of the graph's body (debug/override path, CPU fp32).
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, optimization: str = "all",
                 optimized_model_path: str | os.PathLike | None = None, threads: int = 0,
                 lsh_kernel: bool = False):
        if not os.path.isfile(path):
            raise ReformerDistError(f"{path}: no such ONNX model")
        self.path = str(path)
        if lsh_kernel:
            from reformer_dist.export.ort_kernels import kernel_model, register_lsh_kernel

            try:
                model = kernel_model(path)
            except ValueError as e:
                raise ReformerDistError(str(e)) from None
            self.session = create_session(path, providers, optimization, optimized_model_path, threads,
                                          register_lsh_kernel(), model_bytes=model)
        else:
            self.session = create_session(path, providers, optimization, optimized_model_path, threads)
        self.providers = self.session.get_providers()
        from reformer_dist.export.metadata import read_metadata

        self.metadata = read_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.config: dict[str, Any] = json.loads(self.metadata.get("config", "{}"))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._device = output_device(self.session)

    @property
    def max_seq_len(self) -> int:
        return int(self.metadata.get("max_seq_len", self.config.get("max_seq_len", 0)))

    @property
    def vocab_size(self) -> int:
        return int(self.metadata.get("vocab_size", self.config.get("vocab_size", 0)))

    @property
    def pad_multiple(self) -> int:
        return int(self.metadata.get("pad_multiple", 1))

    @property
    def tokenizer_spec(self) -> dict | None:
        return metadata_spec(self.metadata)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """(B, L) int64 token ids [and (B, L) 1 = real mask, right padding] -> (B, L, vocab) float32."""
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise ReformerDistError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        if self.max_seq_len and input_ids.shape[1] > self.max_seq_len:
            raise ReformerDistError(f"length {input_ids.shape[1]} exceeds the model's max_seq_len {self.max_seq_len}")
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_output("logits", self._device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)

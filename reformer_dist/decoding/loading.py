"""Open a model for decoding, whatever the path: the backend, its tokenizer and the name it is served as.

    loaded = open_model("runs/tiny")                      # a directory: PyTorch
    loaded = open_model("runs/tiny/model.onnx")           # .onnx: ONNX Runtime (cached with its companions)
    loaded = open_model("model.plan")                     # .plan / .engine: TensorRT

``reformer-dist generate`` and ``reformer-dist serve`` both open models here, so the same path gives the
same backend, tokenizer and model name in both. The model name is the run or model directory's name
(an export records the one it was made from), whatever the backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from reformer_dist.artifacts.model_source import load_model, model_name
from reformer_dist.artifacts.tokenizer_spec import tokenizer_from_metadata
from reformer_dist.data.tokenizer import Tokenizer, get_tokenizer
from reformer_dist.decoding.backend import DecodingBackend
from reformer_dist.errors import ReformerDistError

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ENGINE_SUFFIXES = (".plan", ".engine")


@dataclass
class LoadedModel:
    backend: DecodingBackend
    tokenizer: Tokenizer
    name: str
    """The model id in the API: the run or model directory's name."""


def quiet_openmp() -> None:
    """Let OpenMP threads sleep, not spin, while they wait (unless the user chose): on a shared or busy
    machine, a spinning PyTorch thread takes the core the working one needs, which made a 9-token
    prefill take 1.6 s instead of 25 ms (measured on 2 cores at load 10). Effective only before torch is
    imported: the generate and serve commands call it first."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def infer_backend(path: str | os.PathLike) -> str:
    """'onnxruntime' for a .onnx file, 'tensorrt' for a .plan/.engine, 'torch' for a directory."""
    path = Path(path)
    if path.suffix == ".onnx":
        return "onnxruntime"
    if path.suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if path.is_dir() or path.suffix == ".safetensors":
        return "torch"
    raise ReformerDistError(f"{path}: cannot tell the backend from the path (a checkpoint directory, a .onnx "
                            f"or a TensorRT .plan/.engine); pass --backend")


def open_model(path: str | os.PathLike, backend: str | None = None, device: str | None = None,
               threads: int | None = None, tokenizer: str | None = None, providers: list[str] | None = None,
               max_cache_len: int | None = None) -> LoadedModel:
    """Open ``path`` with ``backend`` (default: :func:`infer_backend`), with the tokenizer recorded with the
    model (or ``tokenizer``, a ``--tokenizer`` spec string)."""
    path = str(path)
    kind = backend or infer_backend(path)
    if kind not in BACKENDS:
        raise ReformerDistError(f"unknown backend {kind!r}; choose from {list(BACKENDS)}")
    if not os.path.exists(path):
        raise ReformerDistError(f"{path}: no such file or directory")
    name = model_name(path)
    if kind == "torch":
        import torch

        from reformer_dist.decoding.torch_backend import TorchBackend

        if threads:
            torch.set_num_threads(threads)
        source = load_model(path)
        loaded: DecodingBackend = TorchBackend(source.model, device, max_cache_len=max_cache_len)
    else:
        if kind == "onnxruntime":
            if not path.endswith(".onnx"):
                raise ReformerDistError(f"--backend onnxruntime runs an exported .onnx file, got {path}")
            from reformer_dist.decoding.onnxruntime_backend import open_onnxruntime

            loaded = open_onnxruntime(path, providers, threads or 0)
        else:
            if not path.endswith(ENGINE_SUFFIXES):
                raise ReformerDistError(f"--backend tensorrt runs a TensorRT engine (.plan), got {path}")
            from reformer_dist.decoding.tensorrt_backend import open_tensorrt

            loaded = open_tensorrt(path)
        name = loaded.metadata.get("model_name") or name
    if tokenizer is not None:
        chosen = get_tokenizer(tokenizer)
    elif kind == "torch":
        chosen = get_tokenizer(source.tokenizer) if source.tokenizer is not None else None
    else:
        chosen = tokenizer_from_metadata(loaded.metadata)
    return LoadedModel(loaded, _checked(chosen, loaded, path), name)


def _checked(chosen: Tokenizer | None, backend: DecodingBackend, path: str) -> Tokenizer:
    if chosen is None:
        raise ReformerDistError(f"{path} records no tokenizer: pass --tokenizer (bytes, a tokenizer.json or a "
                                f"sentencepiece .model)")
    if chosen.vocab_size > backend.vocab_size:
        # ids past the model's vocabulary would fail inside a batch, taking other requests down with it
        raise ReformerDistError(f"the tokenizer has {chosen.vocab_size} ids but the model only {backend.vocab_size}")
    return chosen

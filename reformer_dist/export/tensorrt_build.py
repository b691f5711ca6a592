"""TensorRT engines from exported ONNX graphs, and runners for them.

    build_engine("model.onnx", "model.plan", precision="fp16", shapes=parse_shapes("1x64/1x1024/4x4096"))
    TensorRTRunner("model.plan").logits(input_ids)
    TensorRTEngine("model.decode.plan").run({"token": ..., "position": ..., "cache.0.k": ...})   # torch CUDA

The builder goes through TensorRT's ONNX parser with one optimisation profile: every input's dimension
named ``batch`` spans the profile's batch range, its other dynamic dimension (the sequence or prompt
length) the length range, rounded to the graph's chunk multiple where the graph needs whole chunks (the
prefill graph, at least two); static dimensions stay fixed. So the same call builds the logits graph and
the cached-generation graphs (``build_generation_engines``: ``<stem>.prefill.plan`` and
``<stem>.decode.plan`` from ``<stem>.prefill.onnx`` / ``<stem>.decode.onnx``), which the TensorRT
serving backend decodes through (``reformer_dist.decoding.tensorrt_backend``).
``reformer::LshAttention`` nodes become the QDP plugin of
``export/tensorrt/lsh_plugin.py`` when the graph is the ``tensorrt`` flavour (the plugin file is
imported first, which registers it), or plain layers from the node's counting-sort body otherwise
(``portable`` flavour: the engine then needs no Python at run time).

TensorRT cannot be installed on CPU-only machines; everything here imports it lazily and is tested
where ``import tensorrt`` and a GPU work (pytest marker ``tensorrt``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reformer_dist.atomic_write import atomic_write
from reformer_dist.errors import ReformerDistError
from reformer_dist.export.metadata import generation_paths

DEFAULT_PLUGIN = Path(__file__).resolve().parents[2] / "export" / "tensorrt" / "lsh_plugin.py"


@dataclass(frozen=True)
class ShapeProfile:
    """(batch, length) minimum / optimum / maximum of the engine's optimisation profile."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]


def parse_shapes(text: str) -> ShapeProfile:
    """'1x64/1x1024/4x4096' -> ShapeProfile; ReformerDistError on anything else."""
    try:
        triple = [tuple(int(n) for n in part.split("x")) for part in text.split("/")]
    except ValueError:
        triple = []
    if len(triple) != 3 or any(len(t) != 2 for t in triple):
        raise ReformerDistError(f"--shapes must be MIN/OPT/MAX, each BATCHxLENGTH (e.g. 1x64/1x1024/4x4096), "
                                f"got {text!r}")
    profile = ShapeProfile(*triple)
    if not all(1 <= profile.min[i] <= profile.opt[i] <= profile.max[i] for i in range(2)):
        raise ReformerDistError(f"--shapes needs 1 <= min <= opt <= max in batch and length, got {text!r}")
    return profile


def default_shapes(metadata: dict[str, str]) -> ShapeProfile:
    """Batch 1; lengths from the chunk multiple to the exported max_seq_len, optimised for 1024."""
    multiple, longest = int(metadata.get("pad_multiple", 1)), int(metadata.get("max_seq_len", 4096))
    return ShapeProfile((1, multiple), (1, min(1024, longest)), (1, longest))


def input_profiles(graph_inputs: list, shapes: ShapeProfile, metadata: dict[str, str]) -> dict[str, tuple]:
    """Per graph input (``onnx.ValueInfoProto`` list, initializers excluded), its (min, opt, max) shapes
    under ``shapes``: the ``batch`` dimension spans the batch range, another dynamic dimension the length
    range (whole chunk multiples, at least two, for the prefill graph), static dimensions stay."""
    multiple = int(metadata.get("pad_multiple", 1))
    lo, opt, hi = shapes.min[1], shapes.opt[1], shapes.max[1]
    if metadata.get("graph") == "prefill":
        lo = max(2 * multiple, math.ceil(lo / multiple) * multiple)
        hi = max(lo, hi // multiple * multiple)
        opt = min(hi, max(lo, math.ceil(opt / multiple) * multiple))
    profiles = {}
    for value in graph_inputs:
        dims = [(d.dim_value,) * 3 if d.HasField("dim_value") else
                (shapes.min[0], shapes.opt[0], shapes.max[0]) if d.dim_param == "batch" else (lo, opt, hi)
                for d in value.type.tensor_type.shape.dim]
        profiles[value.name] = tuple(tuple(d[k] for d in dims) for k in range(3))
    return profiles


def load_plugin(path: str | os.PathLike | None = None) -> None:
    """Import the QDP plugin definitions (registers ``reformer::LshAttention`` with TensorRT)."""
    path = Path(path) if path else DEFAULT_PLUGIN
    if not path.is_file():
        raise ReformerDistError(f"{path}: no such plugin file")
    spec = importlib.util.spec_from_file_location("reformer_lsh_trt_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ReformerDistError(f"TensorRT is not importable ({e}); install the 'gpu' extra on a CUDA machine") \
            from None
    return trt


def build_engine(onnx_path: str | os.PathLike, output: str | os.PathLike, *, precision: str = "fp32",
                 shapes: ShapeProfile | None = None, timing_cache: str | os.PathLike | None = None,
                 workspace_gb: float | None = None, plugin: str | os.PathLike | None = None) -> Path:
    """Parse ``onnx_path``, build a serialized engine with one profile, write it atomically to ``output``.

    precision: fp32 | fp16 | bf16 (builder flags allowing lower-precision kernels; an fp16-exported
    graph is fp16 regardless). timing_cache: a file read if present and rewritten after the build.
    """
    import onnx

    from reformer_dist.export.metadata import read_metadata

    trt = _trt()
    onnx_path, output = Path(onnx_path), Path(output)
    if not onnx_path.is_file():
        raise ReformerDistError(f"{onnx_path}: no such ONNX model")
    graph = onnx.load(str(onnx_path), load_external_data=False)
    metadata = read_metadata(graph)
    shapes = shapes or default_shapes(metadata)
    initializers = {t.name for t in graph.graph.initializer}
    profiles = input_profiles([i for i in graph.graph.input if i.name not in initializers], shapes, metadata)
    if metadata.get("flavour") == "tensorrt":
        load_plugin(plugin)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ReformerDistError(f"{onnx_path}: TensorRT's ONNX parser failed:\n{errors}")

    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif precision != "fp32":
        raise ReformerDistError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ReformerDistError(f"TensorRT could not build an engine from {onnx_path} (see the log above)")
    _write_atomic(output, bytes(serialized))
    _write_atomic(output.with_suffix(output.suffix + ".json"), json.dumps(
        {**metadata, "trt_precision": precision, "trt_shapes": [shapes.min, shapes.opt, shapes.max]}).encode())
    if cache_path is not None:
        _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return output


def build_generation_engines(onnx_path: str | os.PathLike, output: str | os.PathLike, **kwargs) -> list[Path]:
    """Engines of the prefill and decode graphs beside ``onnx_path`` (when both exist), written beside
    ``output`` as ``<stem>.prefill.plan`` / ``<stem>.decode.plan``; ``kwargs`` as :func:`build_engine`'s."""
    sources = generation_paths(onnx_path, ".onnx")
    if not all(p.is_file() for p in sources.values()):
        return []
    targets = generation_paths(output, ".plan")
    return [build_engine(sources[name], targets[name], **kwargs) for name in sources]


class TensorRTEngine:
    """One deserialized engine: ``run(feeds)`` takes torch CUDA tensors by input name and returns the
    outputs by name (torch CUDA tensors shaped for these inputs). The export metadata comes from
    ``<engine>.json`` (written by :func:`build_engine`); the plugin file is imported when the engine was
    built from the tensorrt flavour (its JIT implementation runs in this process)."""

    def __init__(self, path: str | os.PathLike, plugin: str | os.PathLike | None = None):
        import torch

        trt = _trt()
        path = Path(path)
        if not path.is_file():
            raise ReformerDistError(f"{path}: no such TensorRT engine")
        sidecar = path.with_suffix(path.suffix + ".json")
        self.metadata: dict = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if self.metadata.get("flavour") == "tensorrt":
            load_plugin(plugin)
        self._torch = torch
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ReformerDistError(f"{path}: TensorRT cannot deserialize the engine (other TensorRT version/GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: getattr(torch, np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))).name) for n in names}

    def profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(min shape, max shape) of input ``name`` in the engine's profile."""
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        return tuple(lo), tuple(hi)

    def run(self, feeds: dict) -> dict:
        torch = self._torch
        for name in self.inputs:
            tensor = feeds[name].contiguous()
            lo, hi = self.profile(name)
            if not all(a <= n <= b for a, n, b in zip(lo, tensor.shape, hi)):
                raise ReformerDistError(f"{name} shape {tuple(tensor.shape)} outside the engine's profile {lo}..{hi}")
            feeds[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n], device="cuda")
               for n in self.outputs}
        for name, tensor in out.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        torch.cuda.current_stream().synchronize()  # inputs written before the engine's stream reads them
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ReformerDistError("TensorRT execution failed (see the log above)")
        self.stream.synchronize()
        return out


class TensorRTRunner:
    """Run a built logits engine: ``logits(input_ids, attention_mask=None)`` like :class:`OrtRunner`."""

    def __init__(self, path: str | os.PathLike, plugin: str | os.PathLike | None = None):
        import torch

        self._torch = torch
        self.engine = TensorRTEngine(path, plugin)
        self.metadata = self.engine.metadata

    @property
    def max_seq_len(self) -> int:
        return int(self.engine.profile("input_ids")[1][1])

    @property
    def max_batch_size(self) -> int:
        return int(self.engine.profile("input_ids")[1][0])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """(B, L) int64 [+ (B, L) mask, 1 = real] -> (B, L, vocab) float32, within the engine's profile."""
        torch = self._torch
        ids = torch.as_tensor(np.ascontiguousarray(input_ids, dtype=np.int64)).cuda()
        mask = torch.ones_like(ids) if attention_mask is None else \
            torch.as_tensor(np.ascontiguousarray(attention_mask, dtype=np.int64)).cuda()
        return self.engine.run({"input_ids": ids, "attention_mask": mask})["logits"].float().cpu().numpy()


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))

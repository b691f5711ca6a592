"""Triton Inference Server model repositories for exported graphs.

``write_triton_repo("model.onnx", "repo/")`` lays out::

    repo/reformer/config.pbtxt          platform onnxruntime_onnx (or tensorrt_plan for model.plan)
    repo/reformer/1/model.onnx          (plus its external-data file, if any)
    repo/reformer_prefill/...           when model.prefill.onnx / .plan sits beside the model
    repo/reformer_decode/...            when model.decode.onnx / .plan sits beside the model

Each ``config.pbtxt`` lists the graph's inputs and outputs with their types and dynamic dims (-1). When
every input and output starts with the same dynamic batch dimension, that dimension becomes Triton's
implicit batch (``max_batch_size`` > 0, ``dynamic_batching`` on); otherwise the model is declared
unbatched (``max_batch_size: 0``, full shapes), which Triton requires for graphs whose state tensors do
not lead with the batch. Decoding loops with state belong to the client or a BLS model: Triton runs
each graph once per request.

A TensorRT plan carries no readable ONNX graph: its tensors are read through TensorRT when it is
importable, otherwise from the ``.onnx`` with the same stem that the plan was built from.
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from reformer_dist.atomic_write import atomic_directory, umask_mode
from reformer_dist.errors import ReformerDistError

ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32", 13: "TYPE_UINT64",
    16: "TYPE_BF16",
}
PLATFORMS = {".onnx": "onnxruntime_onnx", ".plan": "tensorrt_plan"}
COMPANIONS = ("prefill", "decode")  # model.prefill.onnx, model.decode.onnx beside model.onnx


@dataclass
class TensorSpec:
    name: str
    data_type: str
    dims: list[int | str]
    """Static sizes as ints, dynamic ones as their symbolic name (or '?' when unnamed)."""


def onnx_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs of an ONNX file, without loading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        if t.elem_type not in ONNX_TO_TRITON:
            raise ReformerDistError(f"{path}: tensor {value.name!r} has an element type Triton cannot carry "
                                    f"({onnx.TensorProto.DataType.Name(t.elem_type)})")
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in t.shape.dim]
        return TensorSpec(value.name, ONNX_TO_TRITON[t.elem_type], dims)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def plan_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int | None]:
    """Inputs and outputs of a TensorRT plan, and the largest batch its profile accepts (None: unknown):
    from the engine if TensorRT loads here, else from the ONNX file it was built from (same stem)."""
    try:
        import tensorrt as trt
    except ImportError:
        source = path.with_suffix(".onnx")
        if not source.is_file():
            raise ReformerDistError(f"{path}: TensorRT is not importable here, and the ONNX file the plan was "
                                    f"built from ({source.name}) is not beside it to read its tensors") from None
        return (*onnx_io(source), None)
    types = {trt.float32: "TYPE_FP32", trt.float16: "TYPE_FP16", trt.bfloat16: "TYPE_BF16",
             trt.int8: "TYPE_INT8", trt.int32: "TYPE_INT32", trt.int64: "TYPE_INT64", trt.bool: "TYPE_BOOL",
             trt.uint8: "TYPE_UINT8"}
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ReformerDistError(f"{path}: TensorRT could not deserialize this plan")
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = engine.get_tensor_shape(name)
        spec = TensorSpec(name, types[engine.get_tensor_dtype(name)], [d if d >= 0 else "?" for d in shape])
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    # TensorRT names no dims: a leading dynamic dim shared by every tensor is taken as the batch, and
    # the engine's first optimisation profile bounds it (Triton must not batch past that).
    for spec in inputs + outputs:
        if spec.dims and spec.dims[0] == "?":
            spec.dims[0] = "batch"
    profile_max = min((engine.get_tensor_profile_shape(t.name, 0)[2][0] for t in inputs if t.dims[:1] == ["batch"]),
                      default=None)
    return inputs, outputs, profile_max


def _batch_dim(tensors: list[TensorSpec]) -> bool:
    """True when every tensor leads with the same dynamic dimension (Triton's implicit batch)."""
    firsts = {t.dims[0] if t.dims else None for t in tensors}
    return len(firsts) == 1 and isinstance(next(iter(firsts)), str) and next(iter(firsts)) != "?"


def config_pbtxt(name: str, platform: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 max_batch_size: int, instances: int, kind: str, queue_delay_us: int) -> str:
    """The text of one model's config.pbtxt (protobuf text format of inference.ModelConfig)."""
    batched = max_batch_size > 0 and _batch_dim(inputs + outputs)

    def tensor(t: TensorSpec) -> str:
        dims = t.dims[1:] if batched else t.dims
        shown = ", ".join(str(d) if isinstance(d, int) else "-1" for d in dims)
        return f'  {{\n    name: "{t.name}"\n    data_type: {t.data_type}\n    dims: [ {shown} ]\n  }}'

    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size if batched else 0}",
             "input [", ",\n".join(tensor(t) for t in inputs), "]",
             "output [", ",\n".join(tensor(t) for t in outputs), "]"]
    if batched:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {queue_delay_us}\n}}")
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _external_data_files(path: Path) -> list[Path]:
    """Files holding an ONNX model's external tensors (they must travel with it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in init.external_data if e.key == "location")
    return [path.parent / n for n in sorted(names)]


def write_triton_repo(model: str | os.PathLike, output: str | os.PathLike, *, name: str = "reformer",
                      max_batch_size: int = 8, instances: int = 1, kind: str = "KIND_AUTO",
                      queue_delay_us: int = 1000) -> list[Path]:
    """Write a Triton model repository for ``model`` (and its prefill/decode companions) under ``output``.
    Returns the directories of the models written. The repository is assembled in a temporary directory
    and moved into place, so a failure leaves no half-written model."""
    path = Path(model)
    if path.suffix not in PLATFORMS:
        raise ReformerDistError(f"{path}: expected an .onnx model or a TensorRT .plan")
    if not path.is_file():
        raise ReformerDistError(f"{path}: no such file")
    if kind not in ("KIND_GPU", "KIND_CPU", "KIND_AUTO"):
        raise ReformerDistError(f"instance kind must be KIND_GPU, KIND_CPU or KIND_AUTO, got {kind!r}")
    if max_batch_size < 0 or instances < 1:
        raise ReformerDistError("max_batch_size must be >= 0 and instances >= 1")

    models = [(name, path)]
    for companion in COMPANIONS:
        candidate = path.with_name(f"{path.stem}.{companion}{path.suffix}")
        if candidate.is_file():
            models.append((f"{name}_{companion}", candidate))

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model_name, file in models:
        batch_cap = max_batch_size
        if file.suffix == ".onnx":
            inputs, outputs = onnx_io(file)
        else:
            inputs, outputs, profile_max = plan_io(file)
            batch_cap = min(max_batch_size, profile_max or max_batch_size)
        text = config_pbtxt(model_name, PLATFORMS[file.suffix], inputs, outputs, batch_cap, instances,
                            kind, queue_delay_us)
        final = out / model_name
        with atomic_directory(final) as staging:
            (staging / "1").mkdir()
            shutil.copy2(file, staging / "1" / f"model{file.suffix}")
            if file.suffix == ".onnx":
                for extra in _external_data_files(file):
                    shutil.copy2(extra, staging / "1" / extra.name)
            (staging / "config.pbtxt").write_text(text)
            # copy2 keeps the source's mode; the server often runs as another user: give the files the
            # mode open() would (under the usual umask 644)
            for p in (staging / "1").iterdir():
                p.chmod(umask_mode())
        written.append(final)
    return written


# ------------------------------------------------------------- `reformer-dist export triton-repo` glue
SUMMARY = "write a Triton Inference Server model repository for an exported .onnx or .plan"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="FILE",
                   help="model.onnx or model.plan; model.prefill.* / model.decode.* beside it are added too")
    p.add_argument("--output", "-o", required=True, metavar="REPO", help="the model repository directory")
    p.add_argument("--name", default="reformer", help="model name in the repository (default reformer)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="Triton's max_batch_size for graphs with a leading batch dimension (default 8)")
    p.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    p.add_argument("--kind", choices=("KIND_GPU", "KIND_CPU", "KIND_AUTO"), default="KIND_AUTO",
                   help="where the instances run (default KIND_AUTO: Triton uses the GPUs of the machine that "
                        "serves the repository, or its CPU when it has none)")
    p.add_argument("--queue-delay-us", type=int, default=1000,
                   help="dynamic batching: how long Triton may hold a request to batch it (default 1000)")


def run(args: argparse.Namespace) -> int:
    written = write_triton_repo(args.model, args.output, name=args.name, max_batch_size=args.max_batch_size,
                                instances=args.instances, kind=args.kind, queue_delay_us=args.queue_delay_us)
    for directory in written:
        print(f"wrote {directory}/config.pbtxt")
    return 0

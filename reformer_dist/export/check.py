"""Static check of an ONNX graph against what a target runtime's importer accepts.

``check_model(model, target)`` inlines the model-local functions (what ONNX Runtime does, and what
TensorRT does when no plugin claims a node), lists the operators and reports findings:

- ``tensorrt``: operators the onnx-tensorrt parser (TensorRT 10.15, opset 9-24) does not implement,
  and its documented restrictions: TopK's K must be a build-time constant below 3840 (a K computed from
  the sequence length fails once n_hashes*L or L reaches it), CumSum's axis constant and float input,
  Reduce*/Squeeze/Unsqueeze axes constant, NonZero float input, OneHot depth constant; warnings for
  ReduceLogSumExp (lowered without the max shift: overflows in fp16) and Loop (static scan lengths);
  custom-domain nodes need a plugin unless they carry a body.
- ``onnxruntime``: every node needs a kernel of the CPU provider for its (domain, op, opset) and the
  element type of its first input.

Used by ``reformer-dist export check`` and by the export tests on every flavour.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import onnx
import onnx.inliner
from onnx import TensorProto

from reformer_dist.errors import ReformerDistError, describe

TARGETS = ("tensorrt", "onnxruntime")
TRT_TOPK_MAX = 3840  # exclusive: "K input must be less than 3840" (onnx-tensorrt docs/operators.md)
TRT_OPSETS = (9, 24)

# onnx-tensorrt (TensorRT 10.15) operator support matrix: "Y" rows ...
TRT_SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())  # noqa: SIM905 (a table reads better as words)
# ... and the inputs that must be build-time constants (input index per op)
TRT_CONSTANT_INPUTS = {
    "CumSum": (1, "axis"), "OneHot": (1, "depth"), "Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"),
    **{op: (1, "axes") for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                  "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
TRT_FLOAT_ONLY = {"CumSum": ("FP32", "FP16", "BF16"), "NonZero": ("FP32", "FP16")}
_FLOAT_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16"}
# ops whose output is a function of constant inputs only (for constant propagation)
_PURE = frozenset("""Identity Cast CastLike Reshape Squeeze Unsqueeze Concat Add Sub Mul Div Neg Gather Slice
Range Mod Min Max Abs Equal Less Greater Not And Or Where ConstantOfShape Expand Transpose Flatten""".split())  # noqa: SIM905


@dataclass
class Finding:
    level: str  # "error" (the target rejects the graph), "warning" (runs, with a hazard), "info"
    op: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.level.upper():7s} {self.op:16s} {self.node}: {self.message}"


@dataclass
class CheckReport:
    target: str
    ops: collections.Counter = field(default_factory=collections.Counter)
    """Operator counts of the inlined graph, keyed 'domain::Op' ('Op' for the default domain)."""
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"target: {self.target}", f"{sum(self.ops.values())} nodes, {len(self.ops)} operator types:"]
        lines += [f"  {count:6d}  {op}" for op, count in sorted(self.ops.items())]
        lines += [str(f) for f in self.findings]
        lines.append(f"{'PASS' if self.ok else 'FAIL'} ({len(self.errors)} errors, "
                     f"{sum(f.level == 'warning' for f in self.findings)} warnings)")
        return "\n".join(lines)


def load_onnx(path: str) -> onnx.ModelProto:
    """The ModelProto in ``path``; ReformerDistError naming the file if it is not a readable ONNX model."""
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf's DecodeError, a missing external-data file, ...
        raise ReformerDistError(f"{path}: not a readable ONNX model ({describe(e)})") from None
    if not model.graph.node or not model.opset_import:  # protobuf parses some foreign bytes as an empty model
        raise ReformerDistError(f"{path}: not an ONNX model (no graph or no opset)")
    return model


def check_model(model: onnx.ModelProto | str, target: str) -> CheckReport:
    """Inline the local functions of ``model`` and check every node against ``target``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if isinstance(model, str):
        model = load_onnx(model)
    report = CheckReport(target)
    with_body = {(f.domain, f.name) for f in model.functions}
    for node in model.graph.node:  # what claims each custom node before it is inlined
        if node.domain not in ("", "ai.onnx"):
            _custom_node(report, node, (node.domain, node.op_type) in with_body)

    inlined = onnx.inliner.inline_local_functions(model)
    inferred = onnx.shape_inference.infer_shapes(inlined)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    types.update({t.name: t.data_type for t in inlined.graph.initializer})
    opset = next(o.version for o in inlined.opset_import if o.domain in ("", "ai.onnx"))
    constants = _constant_values(inlined.graph, opset)
    kernels = _ort_kernels() if target == "onnxruntime" else None

    for node in inlined.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        report.ops[key] += 1
        if node.domain not in ("", "ai.onnx"):
            continue  # a custom node left after inlining has no body: reported above
        if target == "tensorrt":
            _check_trt(report, node, constants, types, opset)
        else:
            _check_ort(report, node, kernels, types, opset)
    if target == "tensorrt" and not TRT_OPSETS[0] <= opset <= TRT_OPSETS[1]:
        report.findings.append(Finding("error", "opset", "model", f"opset {opset} outside TensorRT's {TRT_OPSETS}"))
    return report


def _custom_node(report: CheckReport, node: onnx.NodeProto, has_body: bool) -> None:
    name = f"{node.domain}::{node.op_type}"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if report.target == "tensorrt" and "plugin_namespace" in attrs:
        ns = attrs["plugin_namespace"].decode()
        version = attrs.get("plugin_version", b"1").decode()
        fallback = "the standard-op body otherwise (checked below)" if has_body else "no body to fall back on"
        report.findings.append(Finding("info", name, node.name, f"TensorRT >= 10.7 uses plugin {ns}::{node.op_type} "
                                       f"v{version} when registered; {fallback}"))
    elif not has_body:
        report.findings.append(Finding("error", name, node.name, "custom op without a function body: needs a "
                                       f"{report.target} kernel/plugin registered for it"))


def _check_trt(report: CheckReport, node: onnx.NodeProto, constants: dict, types: dict, opset: int) -> None:
    op = node.op_type

    def add(level: str, message: str) -> None:
        report.findings.append(Finding(level, op, node.name or node.output[0], message))

    if op not in TRT_SUPPORTED:
        add("error", "not implemented by TensorRT's ONNX parser")
        return
    if op in TRT_CONSTANT_INPUTS:
        index, what = TRT_CONSTANT_INPUTS[op]
        if len(node.input) > index and node.input[index] and node.input[index] not in constants:
            add("error", f"`{what}` must be a build-time constant")
    if op in TRT_FLOAT_ONLY:
        dtype = _FLOAT_NAMES.get(types.get(node.input[0]))
        if dtype not in TRT_FLOAT_ONLY[op]:
            add("error", f"input type {TensorProto.DataType.Name(types.get(node.input[0], 0))} unsupported "
                         f"(only {', '.join(TRT_FLOAT_ONLY[op])})")
    if op == "TopK":
        k = constants.get(node.input[1])
        if k is None:
            add("error", f"K is computed at run time (e.g. from the sequence length); TensorRT needs K < "
                         f"{TRT_TOPK_MAX}, which fails for long sequences: use the counting-sort body")
        elif int(k.max()) >= TRT_TOPK_MAX:
            add("error", f"K = {int(k.max())} >= {TRT_TOPK_MAX}")
        if any(a.name == "sorted" and a.i == 0 for a in node.attribute):
            add("error", "`sorted` must be 1")
    if op == "CumSum":
        add("info", "built as a loop over the axis: O(length) sequential steps")
    if op == "ReduceLogSumExp":
        add("warning", "lowered as Exp then ReduceLogSum without the max shift: overflows in fp16")
    if op == "Loop":
        add("warning", "scan output lengths must be static")


def _check_ort(report: CheckReport, node: onnx.NodeProto, kernels: dict, types: dict, opset: int) -> None:
    if node.op_type == "Constant":  # becomes an initializer
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        report.findings.append(Finding("error", node.op_type, node.name, f"no ONNX schema at opset {opset}"))
        return
    if schema.has_function or schema.has_context_dependent_function:
        return  # ONNX Runtime expands it into other ops when it has no kernel
    candidates = [k for k in kernels.get((node.domain or "", node.op_type), [])
                  if k.version_range[0] <= schema.since_version <= k.version_range[1]]
    if not candidates:
        report.findings.append(Finding("error", node.op_type, node.name,
                                       f"no CPU kernel for opset {schema.since_version}"))
        return
    if not schema.inputs or not node.input or node.input[0] not in types:
        return
    param = schema.inputs[0].type_str
    type_str = f"tensor({_ORT_TYPE_NAMES.get(types[node.input[0]], '?')})"
    if not any(type_str in k.type_constraints.get(param, [type_str]) for k in candidates):
        # ONNX Runtime runs half-precision nodes without a CPU kernel in fp32 through inserted Casts
        half = types[node.input[0]] in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
        report.findings.append(Finding("warning" if half else "error", node.op_type, node.name,
                                       f"no CPU kernel for {type_str}" + (": runs in fp32 via casts" if half else "")))


_ORT_TYPE_NAMES = {TensorProto.FLOAT: "float", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
                   TensorProto.DOUBLE: "double", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
                   TensorProto.BOOL: "bool", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8"}


def _ort_kernels() -> dict:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    kernels = collections.defaultdict(list)
    for k in ort_c.get_all_opkernel_def():
        if k.provider == "CPUExecutionProvider":
            kernels[("" if k.domain == "ai.onnx" else k.domain, k.op_name)].append(k)
    return kernels


def _constant_values(graph: onnx.GraphProto, opset: int) -> dict:
    """Values known at build time: initializers, Constant outputs, and small pure ops of those (folded)."""
    from onnx.reference import ReferenceEvaluator

    values = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type in _PURE and all(i in values and values[i].size <= 1024 for i in node.input if i):
            inputs = [onnx.numpy_helper.from_array(values[i], i) for i in dict.fromkeys(node.input) if i]
            single = onnx.helper.make_graph([node], "fold", [], [onnx.helper.make_value_info(o, onnx.TypeProto())
                                                                 for o in node.output], initializer=inputs)
            model = onnx.helper.make_model(single, opset_imports=[onnx.helper.make_opsetid("", opset)])
            values.update(zip(node.output, ReferenceEvaluator(model).run(None, {})))
    return values

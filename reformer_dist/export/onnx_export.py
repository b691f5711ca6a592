"""Export a ReformerLM to ONNX: one ``reformer::LshAttention`` node per LSH layer, carrying its body.

    export_onnx(model, "model.onnx", precision="fp32", flavour="portable")

The graph maps ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64 (1 = real token, right
padding) to ``logits`` (B, L, vocab); B and L are dynamic. L need not be a multiple of the chunk
length: the model pads inside the graph (it is traced at a length that is *not* a multiple, so the
padding path is the one recorded; with zero padding it is the identity).

Route (see ``shared/notes/onnx-tensorrt-export.md``): ``torch.onnx.export(dynamo=True)`` with a
``custom_translation_table`` that turns ``torch.ops.reformer.lsh_attention`` into one bare node, then
our own pass appends the FunctionProto body (the exporter would inline any function it was given).
Flavours:

- ``portable``: node + body; ONNX Runtime inlines the body, TensorRT parses the counting-sort body.
- ``tensorrt``: adds ``plugin_namespace``/``plugin_version``/``aot`` so TensorRT >= 10.7 uses the
  ``reformer::LshAttention`` plugin (``export/tensorrt/lsh_plugin.py``) instead of the body
  (``aot=0``: the plugin's implementation is JIT; when it is not registered the body is used).
- ``ort-tensorrt``: the node (and its body) move to domain ``trt.plugins``, the only domain in which
  ONNX Runtime's TensorRT provider hands nodes to TensorRT plugins; CPU/CUDA providers still inline.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from reformer_dist.atomic_write import atomic_write
from reformer_dist.errors import ReformerDistError
from reformer_dist.export.config import ExportConfig
from reformer_dist.export.lsh_onnx import DOMAIN, OP_TYPE, lsh_function, translate_lsh_attention
from reformer_dist.export.lsh_onnx import LshNode as LshSpec  # an LshNode (old name at its use below)
from reformer_dist.export.metadata import FORMAT_VERSION, set_metadata
from reformer_dist.model.reformer import ROTATION_SEED

TRT_PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"


class LogitsGraph(nn.Module):
    """What is exported: (input_ids, attention_mask) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask)


def export_onnx(
    model: nn.Module,
    output: str | os.PathLike,
    *,
    precision: str = "fp32",
    flavour: str = "portable",
    sort: str = "counting",
    opset: int = 18,
    max_seq_len: int | None = None,
    tokenizer: dict | None = None,
    rotation_seed: int = ROTATION_SEED,
    generation: bool = False,
    model_name: str | None = None,
) -> onnx.ModelProto:
    """Export ``model`` (a ReformerLM) to ``output`` and return the saved ModelProto.

    precision: fp32 | fp16 (weights and activations; hashing stays fp32) | int8 (the fp32 graph with its
    linear layers dynamically quantized, see ``quantize.py``). flavour: see module doc.
    sort: the LSH body's sort, 'counting' (TensorRT-parsable) or 'topk'. max_seq_len: the longest
    sequence the deployment promises (metadata; defaults to the model's). tokenizer: the tokenizer spec
    (``reformer_dist.data.tokenizer``); a file tokenizer's file is embedded in the metadata.
    rotation_seed: the LSH rotations frozen into the graph are ``ReformerLM.freeze_rotations(rotation_seed)``'s
    draw (``hash_seed``'s when the config sets one), the same draw PyTorch decoding and serving use by
    default. generation: also write ``<stem>.prefill.onnx`` and ``<stem>.decode.onnx``
    (cached generation, same rotations; see ``generation_export``). model_name: recorded as the served
    model id (default: none; the CLI records the run or model directory name).
    """
    ExportConfig(precision=precision, flavour=flavour, opset=opset, lsh_sort=sort).validate("export_onnx")
    config = model.config
    max_seq_len = max_seq_len or config.max_seq_len
    if not 1 <= max_seq_len <= config.max_seq_len:
        raise ReformerDistError(f"--max-seq-len {max_seq_len} must be in [1, model.max_seq_len={config.max_seq_len}]")

    if generation:  # refuse before writing anything
        from reformer_dist.export.generation_export import check_supported

        check_supported(model)
    if precision == "int8":
        return _export_int8(model, output, flavour=flavour, sort=sort, opset=opset, max_seq_len=max_seq_len,
                            tokenizer=tokenizer, rotation_seed=rotation_seed, generation=generation,
                            model_name=model_name)
    model = deployment_copy(model, precision, rotation_seed)
    # trace at a length that needs padding (see module doc), within the positional table
    multiple = config.pad_multiple()
    length = min(multiple + 1, config.max_seq_len) if multiple > 1 else min(2, config.max_seq_len)
    example = (torch.zeros(2, length, dtype=torch.long), torch.ones(2, length, dtype=torch.long))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with torch.no_grad():
        program = torch.onnx.export(
            LogitsGraph(model).eval(), example, dynamo=True, opset_version=opset, verbose=False,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
            custom_translation_table={torch.ops.reformer.lsh_attention.default: translate_lsh_attention},
        )
    proto = program.model_proto
    attach_lsh_function(proto, sort=sort, fp16_constants=precision == "fp16")
    apply_flavour(proto, flavour)
    set_metadata(proto, {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(dataclasses.asdict(config)),
        "precision": precision,
        "flavour": flavour,
        "lsh_sort": sort,
        "max_seq_len": str(max_seq_len),
        "pad_multiple": str(multiple),
        "vocab_size": str(config.vocab_size),
        "rotation_seed": str(rotation_seed),
        "version": package_version(),
        **({"model_name": model_name} if model_name else {}),
        **tokenizer_metadata(tokenizer),
    })
    onnx.checker.check_model(proto, full_check=True)
    save_model(proto, output)
    if generation:
        from reformer_dist.export.generation_export import export_generation

        export_generation(model, output, precision=precision, opset=opset, max_seq_len=max_seq_len,
                          rotation_seed=rotation_seed, sort=sort, tokenizer=tokenizer, model_name=model_name)
    return proto


def _export_int8(model: nn.Module, output: str | os.PathLike, generation: bool, **kwargs) -> onnx.ModelProto:
    """The fp32 export (and its generation graphs), quantized into ``output`` (and its companions)."""
    from reformer_dist.export.metadata import generation_paths
    from reformer_dist.export.quantize import quantize_int8

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / Path(output).name
        export_onnx(model, fp32, precision="fp32", generation=generation, **kwargs)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        proto = quantize_int8(fp32, output)
        if generation:
            for name, path in generation_paths(fp32).items():
                quantize_int8(path, generation_paths(output)[name])
    return proto


def deployment_copy(model: nn.Module, precision: str, rotation_seed: int = ROTATION_SEED) -> nn.Module:
    """A CPU eval copy of ``model`` in ``precision`` with its LSH rotations frozen to
    ``model.draw_rotations(rotation_seed)``: graphs hold them as constants (unfrozen, a model without
    ``hash_seed`` draws fresh ones per forward, which torch.export cannot trace). They stay fp32."""
    model = copy.deepcopy(model).eval().to("cpu").freeze_rotations(rotation_seed)
    return model.half() if precision == "fp16" else model


def lsh_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's LshAttention nodes (either domain)."""
    return [n for n in proto.graph.node if n.op_type == OP_TYPE and n.domain in (DOMAIN, TRT_PLUGIN_DOMAIN)]


def attach_lsh_function(proto: onnx.ModelProto, sort: str = "counting", fp16_constants: bool = False) -> None:
    """Append the body of ``reformer::LshAttention`` (one per model: all LSH layers share a spec)."""
    specs = {LshSpec.from_node(n) for n in lsh_nodes(proto)}
    if not specs:
        return
    if len(specs) > 1:
        raise ReformerDistError(f"LSH layers disagree on their attention spec: {sorted(map(str, specs))}")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    proto.functions.append(lsh_function(specs.pop(), sort=sort, fp16_constants=fp16_constants, opset=opset))


def apply_flavour(proto: onnx.ModelProto, flavour: str) -> None:
    """Add the TensorRT plugin attributes / move the node to ``trt.plugins`` (see module doc)."""
    if flavour == "portable":
        return
    for node in lsh_nodes(proto):
        node.attribute.extend([onnx.helper.make_attribute("plugin_namespace", DOMAIN),
                               onnx.helper.make_attribute("plugin_version", PLUGIN_VERSION),
                               onnx.helper.make_attribute("aot", 0)])  # the plugin has a JIT impl only
    if flavour == "ort-tensorrt":
        for node in lsh_nodes(proto):
            node.domain = TRT_PLUGIN_DOMAIN
        for function in proto.functions:
            if function.domain == DOMAIN and function.name == OP_TYPE:
                function.domain = TRT_PLUGIN_DOMAIN
        for opset in proto.opset_import:
            if opset.domain == DOMAIN:
                opset.domain = TRT_PLUGIN_DOMAIN


def save_model(proto: onnx.ModelProto, output: str | os.PathLike) -> None:
    """Save atomically (temp file + rename); weights above protobuf's 2 GiB limit go to ``<name>.data``."""
    output = Path(output)
    large = proto.ByteSize() > 2**31 - 2**24
    atomic_write(output, lambda tmp: onnx.save_model(proto, tmp, save_as_external_data=large,
                                                     location=f"{output.name}.data"))


def tokenizer_metadata(spec: dict | None) -> dict[str, str]:
    if spec is None:
        return {}
    meta = {"tokenizer": json.dumps({k: (os.path.basename(v) if k == "path" else v) for k, v in spec.items()})}
    if "path" in spec:  # embed the file so the .onnx alone can tokenize
        meta["tokenizer_file"] = base64.b64encode(Path(spec["path"]).read_bytes()).decode("ascii")
    return meta


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reformer-dist")
    except PackageNotFoundError:
        return "unknown"

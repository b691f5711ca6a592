"""What every exported graph shares: the model copy it traces, the LshAttention function body attached
after export, the TensorRT flavours, the common metadata and the atomic save.

The logits graph (``logits_export``) and the generation graphs (``generation_export``) both use these;
``onnx_export.export_onnx`` composes them (and int8 quantization) into one export.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import onnx
from torch import nn

from reformer_dist.artifacts.tokenizer_spec import tokenizer_metadata
from reformer_dist.atomic_write import atomic_write
from reformer_dist.errors import ReformerDistError
from reformer_dist.export.lsh_onnx import DOMAIN, OP_TYPE, LshNode, lsh_function
from reformer_dist.export.metadata import FORMAT_VERSION
from reformer_dist.model.reformer import ROTATION_SEED

TRT_PLUGIN_DOMAIN = "trt.plugins"
PLUGIN_VERSION = "1"


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
    specs = {LshNode.from_node(n) for n in lsh_nodes(proto)}
    if not specs:
        return
    if len(specs) > 1:
        raise ReformerDistError(f"LSH layers disagree on their attention spec: {sorted(map(str, specs))}")
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    proto.functions.append(lsh_function(specs.pop(), sort=sort, fp16_constants=fp16_constants, opset=opset))


def apply_flavour(proto: onnx.ModelProto, flavour: str) -> None:
    """Add the TensorRT plugin attributes / move the node to ``trt.plugins`` (see ``onnx_export``)."""
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


def graph_metadata(config, *, precision: str, sort: str, max_seq_len: int, rotation_seed: int,
                   tokenizer: dict | None, model_name: str | None, **graph_specific: str) -> dict[str, str]:
    """The ``reformer_dist.*`` entries every exported graph records (``export.metadata`` lists them), plus
    ``graph_specific`` ones; ``config`` is the model's ReformerConfig."""
    return {
        "format_version": FORMAT_VERSION,
        **graph_specific,
        "config": json.dumps(dataclasses.asdict(config)),
        "precision": precision,
        "lsh_sort": sort,
        "max_seq_len": str(max_seq_len),
        "pad_multiple": str(config.pad_multiple()),
        "vocab_size": str(config.vocab_size),
        "rotation_seed": str(rotation_seed),
        "version": package_version(),
        **({"model_name": model_name} if model_name else {}),
        **tokenizer_metadata(tokenizer),
    }


def save_model(proto: onnx.ModelProto, output: str | os.PathLike) -> None:
    """Save atomically (temp file + rename); weights above protobuf's 2 GiB limit go to ``<name>.data``."""
    output = Path(output)
    large = proto.ByteSize() > 2**31 - 2**24
    atomic_write(output, lambda tmp: onnx.save_model(proto, tmp, save_as_external_data=large,
                                                     location=f"{output.name}.data"))


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reformer-dist")
    except PackageNotFoundError:
        return "unknown"

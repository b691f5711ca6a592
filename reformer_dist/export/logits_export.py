"""The logits graph: (input_ids, attention_mask) -> logits, with one ``reformer::LshAttention`` node per
LSH layer carrying its body.

    export_logits(model, "model.onnx", precision="fp32", flavour="portable")

The graph maps ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64 (1 = real token, right
padding) to ``logits`` (B, L, vocab); B and L are dynamic. L need not be a multiple of the chunk
length: the model pads inside the graph (it is traced at a length that is *not* a multiple, so the
padding path is the one recorded; with zero padding it is the identity).

Route: ``torch.onnx.export(dynamo=True)`` with a ``custom_translation_table`` that turns
``torch.ops.reformer.lsh_attention`` into one bare node, then our own pass appends the FunctionProto body
(torch 2.13's exporter would inline any function it was given). ``onnx_export.export_onnx`` is the
entry point that adds int8 and the generation graphs.
"""

from __future__ import annotations

import os

import onnx
import torch
from torch import Tensor, nn

from reformer_dist.export.lsh_onnx import translate_lsh_attention
from reformer_dist.export.metadata import set_metadata
from reformer_dist.export.onnx_graph import (
    apply_flavour,
    attach_lsh_function,
    deployment_copy,
    graph_metadata,
    save_model,
)


class LogitsGraph(nn.Module):
    """What is exported: (input_ids, attention_mask) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids, attention_mask=attention_mask)


def export_logits(model: nn.Module, output: str | os.PathLike, *, precision: str, flavour: str, sort: str,
                  opset: int, max_seq_len: int, tokenizer: dict | None, rotation_seed: int,
                  model_name: str | None) -> onnx.ModelProto:
    """Write the logits graph of ``model`` (a ReformerLM) in ``precision`` fp32 or fp16 to ``output`` and
    return it (arguments as ``onnx_export.export_onnx``'s, already validated there)."""
    config = model.config
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
    set_metadata(proto, graph_metadata(config, precision=precision, sort=sort, max_seq_len=max_seq_len,
                                       rotation_seed=rotation_seed, tokenizer=tokenizer, model_name=model_name,
                                       flavour=flavour))
    onnx.checker.check_model(proto, full_check=True)
    save_model(proto, output)
    return proto

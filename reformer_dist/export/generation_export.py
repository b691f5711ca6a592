"""Export cached generation as two ONNX graphs beside the main one: ``<stem>.prefill.onnx`` and
``<stem>.decode.onnx``, tracing ``reformer_dist.model.generation.prefill`` / ``decode_step``.

    export_generation(model, "model.onnx")   # writes model.prefill.onnx and model.decode.onnx

Prefill graph
    inputs   ``input_ids`` (B, P) int64, ``attention_mask`` (B, P) int64 (1 = real token, right padding).
             P must be a multiple of ``pad_multiple`` (metadata) and at least twice it: the runner pads
             the prompt (masked padding is exact: every supported layer is strictly causal).
    outputs  ``logits`` (B, vocab) of each row's last real token, then ``present.<layer>.<name>``.
Decode graph
    inputs   ``token`` (B,) int64, ``position`` (B,) int64 (where the token goes: a row's prompt length,
             then +1 per step), ``cache.<layer>.<name>`` (the previous step's ``present.*``).
    outputs  ``logits`` (B, vocab), ``present.<layer>.<name>``.

``<layer>.<name>`` are the model's cache keys (see generation.py): ``k``, ``v``, ``pos`` for local and
full layers, ``k``, ``v``, ``pos``, ``count`` for bucket-window LSH layers. Every cache tensor has the
batch first and otherwise a fixed shape; full-attention rings hold ``max_seq_len`` tokens. The LSH
rotations are not in the cache: they are frozen into both graphs (``ReformerLM.freeze_rotations``, the
same draw as the main graph and as PyTorch decoding), so a run equals PyTorch generation.

Both graphs pass ``export check --target tensorrt``. The prefill's LSH layers are
``reformer::LshAttention`` nodes carrying the body (as the main graph, with the chosen sort), except a last
layer, which only hashes and builds its cache (the prompt's last token then runs the decode step's ops,
see ``generation.prefill``); its bucket-ring cache is laid out from a bucket order found by counting (one-hot + fp32 CumSum, ``generation.prefill(counting=True)``)
with ``sort="counting"``: TensorRT takes neither a TopK whose K is the prompt length nor an INT64 CumSum.
``sort="topk"`` sorts instead (fewer ops, ONNX Runtime only). The decode graph has no sort and no custom
node (the new token joins its bucket's ring by counting). Chunk-window LSH (imported HF checkpoints) is
refused: its cached state grows with the sequence and its prefill depends on HF's prompt-length layout
rules, which are Python branches.
"""

from __future__ import annotations

import json
import os

import onnx
import torch
from torch import Tensor, nn

from reformer_dist.errors import ReformerDistError
from reformer_dist.export.lsh_onnx import translate_lsh_attention
from reformer_dist.export.metadata import generation_paths, set_metadata
from reformer_dist.export.onnx_graph import attach_lsh_function, deployment_copy, graph_metadata, save_model
from reformer_dist.model.reformer import ROTATION_SEED


def check_supported(model: nn.Module) -> None:
    """Raise if the model has a layer the generation graphs cannot run."""
    cfg = model.config
    if not cfg.causal:
        raise ReformerDistError("generation graphs need a causal model (model.causal is false)")
    if "lsh" in cfg.layer_kinds() and cfg.lsh_window != "bucket":
        raise ReformerDistError(
            f"generation graphs support LSH layers with lsh_window='bucket' only, this model's are "
            f"lsh_window={cfg.lsh_window!r} (an HF import): export the logits graph alone and generate by "
            f"recomputation")


class PrefillGraph(nn.Module):
    """(input_ids, attention_mask) -> (logits, *present) with frozen rotations."""

    def __init__(self, model: nn.Module, rotations: list[Tensor | None], max_len: int, names: list[str],
                 counting: bool):
        super().__init__()
        self.model, self.rotations, self.max_len, self.names = model, rotations, max_len, names
        self.counting = counting

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        from reformer_dist.model.generation import prefill

        logits, cache = prefill(self.model, input_ids, attention_mask, self.rotations, self.max_len,
                                counting=self.counting)
        return (logits, *(cache[n] for n in self.names))


class DecodeGraph(nn.Module):
    """(token, position, *cache) -> (logits, *present) with frozen rotations."""

    def __init__(self, model: nn.Module, rotations: list[Tensor | None], names: list[str]):
        super().__init__()
        self.model, self.names = model, names
        self.rot = {f"{i}.rot": r for i, r in enumerate(rotations) if r is not None}

    def forward(self, token: Tensor, position: Tensor, *cache: Tensor) -> tuple[Tensor, ...]:
        from reformer_dist.model.generation import decode_step

        logits, new = decode_step(self.model, token, position, {**dict(zip(self.names, cache)), **self.rot})
        return (logits, *(new[n] for n in self.names))


def export_generation(model: nn.Module, model_path: str | os.PathLike, *, precision: str = "fp32",
                      opset: int = 18, max_seq_len: int | None = None, rotation_seed: int = ROTATION_SEED,
                      sort: str = "counting", tokenizer: dict | None = None,
                      model_name: str | None = None) -> dict[str, onnx.ModelProto]:
    """Write the prefill and decode graphs beside ``model_path`` (see module doc); return their protos.

    Use the same ``rotation_seed`` and ``precision`` as the main graph's export (``export_onnx(...,
    generation=True)`` does); tokenizer, model_name: recorded as in the main graph, so the runner needs
    no other file. max_seq_len: capacity of full-attention caches and the longest sequence generation may
    reach (default: the model's). sort: the LSH body's and the prefill cache layout's (see module doc).
    """
    from reformer_dist.model.generation import prefill

    check_supported(model)
    cfg = model.config
    max_len = max_seq_len or cfg.max_seq_len
    multiple = cfg.pad_multiple()
    if 2 * multiple > max_len:
        raise ReformerDistError(f"max_seq_len {max_len} must hold at least two chunk multiples ({2 * multiple})")
    model = deployment_copy(model, precision, rotation_seed)
    counting = sort == "counting"
    paths = generation_paths(model_path, ".onnx")
    protos = {}
    with torch.no_grad():
        rotations = model.draw_rotations()  # the frozen ones
        # trace at 2 chunk multiples, rows of different lengths (the padded path is the general one)
        ids = torch.zeros(2, 2 * multiple, dtype=torch.long)
        mask = (torch.arange(2 * multiple)[None, :] < torch.tensor([[2 * multiple], [multiple + 1]])).long()
        _, cache = prefill(model, ids, mask, rotations, max_len, counting=counting)
        names = [n for n in cache if not n.endswith(".rot")]
        present = [f"present.{n}" for n in names]
        batch = torch.export.Dim("batch")
        # P = multiple * chunks with chunks >= 2: the prefill's layout branches are then decided statically
        prompt = multiple * torch.export.Dim("chunks", min=2, max=max_len // multiple)
        table = {torch.ops.reformer.lsh_attention.default: translate_lsh_attention}
        prefill_program = torch.onnx.export(
            PrefillGraph(model, rotations, max_len, names, counting).eval(), (ids, mask), dynamo=True, opset_version=opset,
            verbose=False, input_names=["input_ids", "attention_mask"], output_names=["logits", *present],
            dynamic_shapes=({0: batch, 1: prompt}, {0: batch, 1: prompt}), custom_translation_table=table)
        token = torch.zeros(2, dtype=torch.long)
        position = mask.sum(-1)
        cache_in = tuple(cache[n] for n in names)
        decode_program = torch.onnx.export(
            DecodeGraph(model, rotations, names).eval(), (token, position, *cache_in), dynamo=True,
            opset_version=opset, verbose=False, input_names=["token", "position", *(f"cache.{n}" for n in names)],
            output_names=["logits", *present],
            dynamic_shapes=({0: batch}, {0: batch}, tuple({0: batch} for _ in names)), custom_translation_table=table)
    for name, program in (("prefill", prefill_program), ("decode", decode_program)):
        proto = program.model_proto
        attach_lsh_function(proto, sort=sort, fp16_constants=precision == "fp16")
        set_metadata(proto, graph_metadata(cfg, precision=precision, sort=sort, max_seq_len=max_len,
                                           rotation_seed=rotation_seed, tokenizer=tokenizer, model_name=model_name,
                                           graph=name, cache_names=json.dumps(names)))
        onnx.checker.check_model(proto, full_check=True)
        save_model(proto, paths[name])
        protos[name] = proto
    return protos

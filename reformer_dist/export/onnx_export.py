"""Export a ReformerLM to ONNX: the logits graph, and on request its int8 form and the cached-generation
graphs. This is the entry point; the pieces are ``logits_export`` (the logits graph),
``generation_export`` (prefill + decode graphs) and ``quantize`` (int8), which share ``onnx_graph``.

    export_onnx(model, "model.onnx", precision="fp32", flavour="portable")

Each LSH layer is one ``reformer::LshAttention`` node carrying a standard-op function body. Flavours:

- ``portable``: node + body; ONNX Runtime inlines the body, TensorRT parses the counting-sort body.
- ``tensorrt``: adds ``plugin_namespace``/``plugin_version``/``aot`` so TensorRT >= 10.7 uses the
  ``reformer::LshAttention`` plugin (``export/tensorrt/lsh_plugin.py``) instead of the body
  (``aot=0``: the plugin's implementation is JIT; when it is not registered the body is used).
- ``ort-tensorrt``: the node (and its body) move to domain ``trt.plugins``, the only domain in which
  ONNX Runtime's TensorRT provider hands nodes to TensorRT plugins; CPU/CUDA providers still inline.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from torch import nn

from reformer_dist.errors import ReformerDistError
from reformer_dist.export.config import ExportConfig
from reformer_dist.export.generation_export import check_supported, export_generation
from reformer_dist.export.logits_export import export_logits
from reformer_dist.export.metadata import generation_paths
from reformer_dist.export.quantize import quantize_int8
from reformer_dist.model.reformer import ROTATION_SEED


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
        check_supported(model)
    options = dict(sort=sort, opset=opset, max_seq_len=max_seq_len, tokenizer=tokenizer,
                   rotation_seed=rotation_seed, model_name=model_name)
    if precision == "int8":
        # the fp32 export (and its generation graphs), quantized into ``output`` (and its companions)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / Path(output).name
            export_onnx(model, fp32, precision="fp32", flavour=flavour, generation=generation, **options)
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            proto = quantize_int8(fp32, output)
            if generation:
                for name, path in generation_paths(fp32).items():
                    quantize_int8(path, generation_paths(output)[name])
        return proto
    proto = export_logits(model, output, precision=precision, flavour=flavour, **options)
    if generation:
        export_generation(model, output, precision=precision, **options)
    return proto

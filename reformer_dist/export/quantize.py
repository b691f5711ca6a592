"""int8 engines for ONNX Runtime: dynamic quantization of the linear layers, and what it costs in quality.

    quantize_int8("model.fp32.onnx", "model.onnx")                      # ONNX Runtime's own tooling
    report = quality_cost("model.onnx", "model.fp32.onnx", "runs/data/stdlib")
    print(report.format())                                             # held-out loss, int8 vs fp32

``quantize_int8`` runs ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations
quantized per call) on the MatMuls whose weight is a 2-D constant, i.e. the model's linear layers
(projections, feed-forward, LM head). Everything else stays fp32: the ``reformer::LshAttention`` nodes
and their function body (the quantizer leaves functions alone), the LSH rotations (per-head, so never
2-D) and the decode graph's hashing MatMul with them, attention scores and embeddings. ONNX Runtime
fuses each quantized MatMul into ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` kernels (VNNI
where the CPU has it).

``quality_cost`` measures the mean next-token loss of two graphs on the same held-out windows (a
prepared data directory's ``val`` split): what ``reformer-dist export check --reference`` reports.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import onnx

from reformer_dist.atomic_write import atomic_write
from reformer_dist.errors import ReformerDistError
from reformer_dist.export.metadata import read_metadata, set_metadata


def linear_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Names of the graph's MatMul nodes whose second input is a 2-D initializer (a linear layer)."""
    weights = {t.name for t in proto.graph.initializer if len(t.dims) == 2}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_int8(source: str | os.PathLike, output: str | os.PathLike) -> onnx.ModelProto:
    """Write ``source`` (an fp32 export) with int8 dynamically quantized linear layers to ``output``;
    its metadata says ``precision: int8``. Returns the written model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(source))
    nodes = linear_matmuls(proto)
    if not nodes:
        raise ReformerDistError(f"{source}: no linear-layer MatMul to quantize")
    written: list[onnx.ModelProto] = []

    def write(tmp: str) -> None:
        quantize_dynamic(str(source), tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True})
        quantized = onnx.load(tmp)
        set_metadata(quantized, {"precision": "int8", "quantized_from": read_metadata(proto).get("precision", "fp32")})
        onnx.checker.check_model(quantized, full_check=True)
        onnx.save_model(quantized, tmp)
        written.append(quantized)

    # the served artefact: complete or absent, mode 0644 under the usual umask, on disk before the rename
    atomic_write(output, write, fsync=True)
    quantized = written[0]
    return quantized


@dataclass
class QualityReport:
    model: str
    reference: str
    loss: float
    """Mean next-token loss (nats) of ``model`` on the held-out windows."""
    reference_loss: float
    tokens: int
    """Tokens scored (each window's first token is context only)."""

    @property
    def relative(self) -> float:
        """(loss - reference_loss) / reference_loss."""
        return (self.loss - self.reference_loss) / self.reference_loss

    def format(self) -> str:
        bits = 1 / math.log(2)
        return (f"held-out loss over {self.tokens} tokens: {self.loss:.4f} nats/token ({self.loss * bits:.4f} "
                f"bits/token) vs {self.reference_loss:.4f} ({self.reference_loss * bits:.4f}) for the reference "
                f"{self.reference}: {100 * self.relative:+.2f}%")


def heldout_windows(data_dir: str | os.PathLike, seq_len: int, windows: int, split: str = "val") -> np.ndarray:
    """The first ``windows`` windows of ``seq_len + 1`` tokens of a prepared data split: (N, seq_len + 1)."""
    from reformer_dist.data.dataset import TokenWindowDataset

    dataset = TokenWindowDataset(str(data_dir), split=split, seq_len=seq_len)
    return np.stack([dataset[i] for i in range(min(windows, len(dataset)))])


def mean_loss(model_path: str | os.PathLike, windows: np.ndarray, threads: int = 0) -> float:
    """Mean next-token cross-entropy (nats) of an exported graph over ``windows`` (N, T + 1)."""
    from reformer_dist.decoding.sampler import log_softmax
    from reformer_dist.export.ort_runner import OrtRunner

    runner = OrtRunner(model_path, threads=threads)
    total = 0.0
    for window in windows:
        logp = log_softmax(runner.logits(window[None, :-1])[0])
        total -= float(logp[np.arange(len(window) - 1), window[1:]].sum())
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def quality_cost(model_path: str | os.PathLike, reference_path: str | os.PathLike, data_dir: str | os.PathLike,
                 seq_len: int | None = None, windows: int = 16, split: str = "val") -> QualityReport:
    """Held-out loss of ``model_path`` vs ``reference_path`` on the same windows (default length: the
    export's max_seq_len, at most 1024)."""
    meta = read_metadata(onnx.load(str(model_path), load_external_data=False))
    seq_len = seq_len or min(1024, int(meta.get("max_seq_len", 1024)))
    data = heldout_windows(data_dir, seq_len, windows, split)
    return QualityReport(str(model_path), str(reference_path), mean_loss(model_path, data),
                         mean_loss(reference_path, data), data.shape[0] * seq_len)

"""TensorRT: profile parsing everywhere; engines (body and plugin) where TensorRT and a GPU exist."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.errors import ReformerDistError
from reformer_dist.export.onnx_export import export_onnx
from reformer_dist.export.onnx_graph import apply_flavour, save_model
from reformer_dist.export.ort_runner import OrtRunner
from reformer_dist.export.tensorrt_build import ShapeProfile, default_shapes, parse_shapes


def test_parse_shapes():
    assert parse_shapes("1x64/2x1024/4x4096") == ShapeProfile((1, 64), (2, 1024), (4, 4096))
    for bad in ("1x64/1x32/1x128", "1x64/1x128", "64/128/256", "0x64/1x64/1x64", "ax1/1x1/1x1"):
        with pytest.raises(ReformerDistError, match="--shapes"):
            parse_shapes(bad)
    assert default_shapes({"pad_multiple": "64", "max_seq_len": "512"}) == ShapeProfile((1, 64), (1, 512), (1, 512))


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    config = ReformerConfig(vocab_size=64, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=2,
                            attn_layers=["local", "lsh"], lsh_chunk_len=64, local_chunk_len=64, max_seq_len=4096,
                            init_std=0.1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("trt") / "model.onnx"
    proto = export_onnx(ReformerLM(config).eval(), path)
    return path, proto


@pytest.mark.tensorrt
@pytest.mark.parametrize("flavour", ["portable", "tensorrt"], ids=["body", "plugin"])
def test_engine_logits_equal_onnxruntime(portable, tmp_path, flavour):
    from reformer_dist.export.tensorrt_build import TensorRTRunner, build_engine

    path, proto = portable
    if flavour != "portable":
        proto = copy.deepcopy(proto)
        apply_flavour(proto, flavour)
        path = tmp_path / "plugin.onnx"
        save_model(proto, path)
    plan = build_engine(path, tmp_path / "model.plan", shapes=parse_shapes("1x64/2x1024/3x4096"),
                        timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    runner = TensorRTRunner(plan)
    assert (runner.max_batch_size, runner.max_seq_len) == (3, 4096)
    reference = OrtRunner(portable[0], providers=["CPUExecutionProvider"])
    for batch, length in ((1, 64), (3, 1000), (1, 4096)):  # n_hashes * 4096 > 3840: no TopK involved
        ids = np.random.default_rng(length).integers(0, 64, (batch, length))
        np.testing.assert_allclose(runner.logits(ids), reference.logits(ids), atol=1e-3, rtol=0)

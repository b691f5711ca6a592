"""ONNX export: ONNX Runtime (CPU) equals PyTorch, one LshAttention node per LSH layer with a working
body, the kernel override path, flavours, metadata, and the checkpoints the exporter loads."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.artifacts.model_source import load_model
from reformer_dist.atomic_write import umask_mode
from reformer_dist.cli import main
from reformer_dist.errors import CheckpointError, ConfigError, ReformerDistError
from reformer_dist.export import lsh_onnx
from reformer_dist.export.check import check_model
from reformer_dist.export.metadata import read_metadata
from reformer_dist.export.onnx_export import export_onnx
from reformer_dist.export.onnx_graph import TRT_PLUGIN_DOMAIN, apply_flavour, lsh_nodes, save_model
from reformer_dist.export.ort_runner import OrtRunner
from reformer_dist.model.lsh import LshSpec, lsh_attention_reference

TINY = dict(vocab_size=64, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=2, lsh_chunk_len=64,
            local_chunk_len=64, lsh_n_hashes=2, max_seq_len=8192, init_std=0.1)
MODELS = {  # name -> config; 8192 tokens with automatic buckets gives factorised [16, 16] buckets
    "mixed": ReformerConfig(**TINY, attn_layers=["local", "lsh"]),
    "lsh_chunk": ReformerConfig(**{**TINY, "lsh_n_hashes": 4}, attn_layers=["lsh"], lsh_window="chunk"),
    "local": ReformerConfig(**TINY, attn_layers=["local"]),
}


def build(config: ReformerConfig, seed: int = 0) -> ReformerLM:
    torch.manual_seed(seed)
    return ReformerLM(config).eval()


def torch_logits(model: ReformerLM, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    model.freeze_rotations()  # the exported graphs' rotations
    try:
        with torch.no_grad():
            m = None if mask is None else torch.from_numpy(mask)
            return model(torch.from_numpy(ids), attention_mask=m).numpy()
    finally:
        model.unfreeze_rotations()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, path, ModelProto), exported once per module (fp32, portable, counting sort)."""
    out = {}
    root = tmp_path_factory.mktemp("onnx")
    for name, config in MODELS.items():
        model = build(config)
        path = root / f"{name}.onnx"
        out[name] = (model, path, export_onnx(model, path, tokenizer={"kind": "bytes", "offset": 0}))
    return out


@pytest.fixture(scope="module")
def runners(exported):
    return {name: OrtRunner(path, threads=2) for name, (_, path, _) in exported.items()}


CASES = [("mixed", 1, 64), ("mixed", 3, 64), ("mixed", 1, 1000), ("mixed", 3, 1000), ("mixed", 1, 8192),
         ("mixed", 3, 8192), ("lsh_chunk", 1, 64), ("lsh_chunk", 3, 1000), ("lsh_chunk", 1, 8192),
         ("local", 3, 100), ("local", 1, 8192)]


@pytest.mark.parametrize(("name", "batch", "length"), CASES)
def test_onnxruntime_logits_equal_pytorch(exported, runners, name, batch, length):
    # lengths 1000 and 8192 need in-graph padding / give n_hashes * L > 3840 (TopK's TensorRT limit)
    model = exported[name][0]
    ids = np.random.default_rng(length + batch).integers(0, 64, (batch, length))
    expected = torch_logits(model, ids)
    got = runners[name].logits(ids)
    assert got.shape == (batch, length, 64)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_right_padded_batch_matches_pytorch(exported, runners):
    model = exported["mixed"][0]
    ids = np.random.default_rng(1).integers(0, 64, (3, 200))
    mask = np.ones_like(ids)
    mask[1, 150:] = 0
    mask[2, 7:] = 0
    np.testing.assert_allclose(runners["mixed"].logits(ids, mask), torch_logits(model, ids, mask), atol=1e-4, rtol=0)


def test_fp16_export_is_finite_and_close_to_fp32(exported, tmp_path):
    model = exported["mixed"][0]
    path = tmp_path / "fp16.onnx"
    export_onnx(model, path, precision="fp16")
    ids = np.random.default_rng(2).integers(0, 64, (2, 1000))
    got = OrtRunner(path, threads=2).logits(ids)
    expected = torch_logits(model, ids)
    assert np.isfinite(got).all()
    # relative to the whole tensor: rounding qk to fp16 moves a few tokens to other buckets (PyTorch's own
    # fp16 model differs from fp32 the same way), so single logits can differ by more than 2e-2
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 2e-2
    assert read_metadata(onnx.load(path))["precision"] == "fp16"


@pytest.mark.parametrize("name", list(MODELS))
def test_one_lsh_attention_node_per_lsh_layer(exported, name):
    model, _, proto = exported[name]
    nodes = lsh_nodes(proto)
    assert len(nodes) == model.config.layer_kinds().count("lsh")
    assert all(n.domain == lsh_onnx.DOMAIN and len(n.input) == 4 for n in nodes)  # mask: the graph pads
    bodies = [f for f in proto.functions if (f.domain, f.name) == (lsh_onnx.DOMAIN, lsh_onnx.OP_TYPE)]
    assert len(bodies) == (1 if nodes else 0)
    for node in nodes:
        spec = lsh_onnx.LshNode.from_node(node).spec
        cfg = model.config
        assert (spec.window, spec.chunk_len, spec.n_hashes, list(spec.n_buckets), spec.causal) == \
            (cfg.lsh_window, cfg.lsh_chunk_len, cfg.lsh_n_hashes, cfg.lsh_bucket_factors(), cfg.causal)
    onnx.checker.check_model(proto, full_check=True)


def test_registered_ort_kernel_is_used_instead_of_the_body(exported, runners, tmp_path):
    _, path, _ = exported["mixed"]
    # without its function body the node runs only through the kernel: a graph ONNX Runtime cannot load alone
    proto = onnx.load(path)
    del proto.functions[:]
    bare = tmp_path / "no_body.onnx"
    onnx.save(proto, bare)
    with pytest.raises(ReformerDistError, match="cannot load"):
        OrtRunner(bare, threads=2)
    with_kernel = OrtRunner(bare, lsh_kernel=True, threads=2)
    ids = np.random.default_rng(3).integers(0, 64, (2, 300))
    np.testing.assert_allclose(with_kernel.logits(ids), runners["mixed"].logits(ids), atol=1e-5, rtol=0)


# ids avoid the bare word "tensorrt": it is also the marker that skips tests without TensorRT
@pytest.mark.parametrize("flavour", ["portable", "tensorrt"], ids=["portable-flavour", "trt-plugin-flavour"])
def test_static_check_passes_on_exported_flavours(exported, flavour):
    proto = copy.deepcopy(exported["mixed"][2])
    apply_flavour(proto, flavour)
    report = check_model(proto, "tensorrt")
    assert report.ok, report.format()
    assert report.ops["CumSum"] > 0 and "TopK" not in report.ops  # the counting-sort body
    if flavour == "tensorrt":
        assert any(f.level == "info" and "plugin reformer::LshAttention" in f.message for f in report.findings)
    assert check_model(proto, "onnxruntime").ok


def test_ort_tensorrt_flavour_runs_on_cpu_through_its_body(exported, runners, tmp_path):
    proto = copy.deepcopy(exported["mixed"][2])
    apply_flavour(proto, "ort-tensorrt")
    assert {n.domain for n in lsh_nodes(proto)} == {TRT_PLUGIN_DOMAIN}
    onnx.checker.check_model(proto, full_check=True)
    save_model(proto, tmp_path / "ort_trt.onnx")
    ids = np.random.default_rng(4).integers(0, 64, (1, 256))
    np.testing.assert_allclose(OrtRunner(tmp_path / "ort_trt.onnx").logits(ids), runners["mixed"].logits(ids),
                               atol=1e-6, rtol=0)


def test_metadata_records_config_tokenizer_and_flavour(exported, runners):
    model, _, proto = exported["mixed"]
    meta = read_metadata(proto)
    assert json.loads(meta["config"]) == json.loads(json.dumps(dataclasses.asdict(model.config)))
    assert json.loads(meta["tokenizer"]) == {"kind": "bytes", "offset": 0}
    assert (meta["flavour"], meta["precision"], meta["lsh_sort"]) == ("portable", "fp32", "counting")
    assert int(meta["max_seq_len"]) == 8192 and int(meta["vocab_size"]) == 64 and int(meta["pad_multiple"]) == 64
    runner = runners["mixed"]
    assert (runner.max_seq_len, runner.vocab_size, runner.tokenizer_spec) == (8192, 64, {"kind": "bytes", "offset": 0})


# ------------------------------------------------------------------------------------ the LSH body alone
def _op_inputs(node: lsh_onnx.LshNode, b: int, h: int, length: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qk, v = torch.randn(b, h, length, d, generator=g), torch.randn(b, h, length, d, generator=g)
    rot = torch.randn(h, d, node.spec.n_hashes, sum(node.spec.n_buckets) // 2, generator=g)
    mask = None
    if node.has_padding_mask:
        mask = torch.ones(b, length, dtype=torch.bool)
        mask[0, length - length // 3:] = False
    return qk, v, rot, mask


BODY_CASES = [  # window, causal, n_hashes, factors, chunk, before, after, mask, (B, H, L, D)
    ("bucket", True, 2, (8,), 4, 1, 0, True, (2, 2, 32, 8)),
    ("bucket", False, 3, (4, 4), 8, 1, 0, False, (1, 2, 64, 16)),
    ("bucket", True, 2, (4, 8), 4, 1, 0, True, (2, 2, 64, 8)),  # factorised and padded: radix counting sort
    ("chunk", True, 2, (8,), 4, 1, 0, True, (2, 2, 32, 8)),
    ("chunk", False, 3, (4, 4), 8, 2, 1, True, (1, 2, 64, 16)),
    ("chunk", True, 1, (4,), 8, 3, 0, False, (1, 2, 8, 16)),  # look-back wider than the sequence
    ("bucket", True, 2, (64,), 64, 1, 0, False, (1, 2, 2048, 16)),  # n_hashes * L = 4096 > 3840
    ("bucket", True, 1, (64,), 8, 1, 0, True, (2, 2, 256, 8)),  # 65 bucket values: two passes (9 x 8)
    ("bucket", False, 1, (16,), 8, 1, 0, True, (1, 2, 64, 8)),
]


@pytest.mark.parametrize("sort", ["counting", "topk"])
@pytest.mark.parametrize("case", BODY_CASES, ids=lambda c: f"{c[0]}-causal{int(c[1])}-n{c[2]}-L{c[8][2]}")
def test_lsh_body_equals_the_reference_op(case, sort):
    import onnxruntime as ort

    window, causal, n, factors, c, before, after, mask, shape = case
    node = lsh_onnx.LshNode(LshSpec(n, factors, c, before, after, window, causal), has_padding_mask=mask)
    proto = lsh_onnx.node_model(node, sort)
    onnx.checker.check_model(proto, full_check=True)
    qk, v, rot, kpm = _op_inputs(node, *shape)
    feeds = {"qk": qk.numpy(), "v": v.numpy(), "rotations": rot.numpy()}
    if mask:
        feeds["key_padding_mask"] = kpm.numpy()
    out, buckets = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    ref_out, ref_buckets = lsh_attention_reference(qk, v, rot, kpm, None, node.spec)
    np.testing.assert_array_equal(buckets, ref_buckets.numpy())
    np.testing.assert_allclose(out, ref_out.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_lsh_body_masks_the_wrapped_window_when_every_token_shares_a_bucket(causal):
    """Zero rotations hash every token to bucket 0: with one round, the first chunk's look-back wraps into
    the last chunk of the same bucket, which the window must not see (a causal leak otherwise)."""
    import onnxruntime as ort

    node = lsh_onnx.LshNode(LshSpec(1, (16,), 8, 1, 0, "bucket", causal), has_padding_mask=False)
    qk, v, _, _ = _op_inputs(node, 1, 2, 64, 8)
    rot = torch.zeros(2, 8, 1, 8)
    session = ort.InferenceSession(lsh_onnx.node_model(node, "counting").SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out, buckets = session.run(None, {"qk": qk.numpy(), "v": v.numpy(), "rotations": rot.numpy()})
    ref_out, _ = lsh_attention_reference(qk, v, rot, None, None, node.spec)
    assert not buckets.any()
    np.testing.assert_allclose(out, ref_out.numpy(), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- checkpoints
SMALL = ReformerConfig(vocab_size=40, d_model=16, n_heads=2, d_head=8, d_ff=32, n_layers=2, attn_layers=["local", "lsh"],
                       lsh_chunk_len=8, local_chunk_len=8, max_seq_len=128, init_std=0.1)
TRAIN_CONFIG = """
model: {vocab_size: 256, d_model: 32, n_heads: 2, d_head: 16, d_ff: 64, n_layers: 2, attn_layers: [local, lsh],
        lsh_chunk_len: 16, local_chunk_len: 16, max_seq_len: 64, axial_pos_shape: [8, 8]}
train: {max_steps: 2, seq_len: 64, micro_batch_size: 2, eval_every: 0, save_every: 0, log_every: 1}
logging: {wandb: {mode: disabled}}
deepspeed: {zero_stage: 3}
"""


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    """A run directory left by `reformer-dist train` with ZeRO stage 3 (2 steps, one process)."""
    import os
    import subprocess
    import sys

    from reformer_dist.data import prepare_corpus

    work = tmp_path_factory.mktemp("train")
    (work / "corpus").mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "reformer", "hashes", "queries", "into", "buckets"]
    (work / "corpus" / "a.txt").write_text("".join(" ".join(rng.choice(words, 12)) + ".\n" for _ in range(200)))
    prepare_corpus([str(work / "corpus")], str(work / "data"), val_fraction=0.1)
    (work / "micro.yaml").write_text(TRAIN_CONFIG + f"data: {{path: {work / 'data'}}}\n")
    cmd = [sys.executable, "-m", "reformer_dist", "train", "--config", str(work / "micro.yaml"),
           f"train.output_dir={work / 'run'}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return work / "run"


def test_cli_exports_a_zero3_training_run(zero3_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--checkpoint", str(zero3_run), "--output", str(out)]) == 0
    assert "1 LshAttention" in capsys.readouterr().out
    assert main(["export", "check", str(out), "--target", "tensorrt"]) == 0
    runner = OrtRunner(out)
    assert runner.tokenizer_spec == {"kind": "bytes", "offset": 0}
    model = load_model(zero3_run).model
    ids = np.random.default_rng(5).integers(0, 256, (2, 50))
    np.testing.assert_allclose(runner.logits(ids), torch_logits(model, ids), atol=1e-4, rtol=0)


def test_loader_accepts_run_dir_native_dir_and_safetensors_file(zero3_run):
    sources = [load_model(p) for p in (zero3_run, zero3_run / "native",
                                                  zero3_run / "native" / "model.safetensors")]
    assert all(s.kind == "native" and s.tokenizer == {"kind": "bytes", "offset": 0} for s in sources)
    for name, tensor in sources[0].model.state_dict().items():
        assert all(torch.equal(s.model.state_dict()[name], tensor) for s in sources[1:]), name


def test_hf_checkpoint_exports(tmp_path):
    from reformer_dist.artifacts.hf_checkpoint import save_hf

    config = dataclasses.replace(SMALL, lsh_window="chunk")  # what HF checkpoints use
    save_hf(build(config, seed=2), tmp_path / "hf")
    source = load_model(tmp_path / "hf")
    assert source.kind == "hf"
    export_onnx(source.model, tmp_path / "hf.onnx")
    ids = np.random.default_rng(6).integers(0, 40, (1, 100))
    np.testing.assert_allclose(OrtRunner(tmp_path / "hf.onnx").logits(ids), torch_logits(source.model, ids),
                               atol=1e-4, rtol=0)


def test_loader_errors_name_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step_00000001\n")
    with pytest.raises(CheckpointError, match="without a consolidated model"):
        load_model(tmp_path / "run")
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "x.onnx")]) == 2


def test_int8_graph_keeps_lsh_in_fp32_and_stays_within_2_percent_of_fp32_loss(exported, runners, tmp_path, capsys):
    from reformer_dist.data import prepare_corpus

    model, fp32_path, fp32 = exported["mixed"]
    int8_path = tmp_path / "mixed.int8.onnx"
    int8 = export_onnx(model, int8_path, precision="int8", tokenizer={"kind": "bytes", "offset": 0})
    assert int8_path.stat().st_mode & 0o777 == umask_mode()  # readable by a serving uid, as other exports
    # the LSH layers are untouched: same nodes, same function body, fp32 rotations; the linear layers are int8
    assert [n.attribute for n in lsh_nodes(int8)] == [n.attribute for n in lsh_nodes(fp32)]
    assert [f.SerializeToString() for f in int8.functions] == [f.SerializeToString() for f in fp32.functions]
    initializers = {t.name: t for t in int8.graph.initializer}
    assert all(initializers[n.input[2]].data_type == onnx.TensorProto.FLOAT for n in lsh_nodes(int8))
    ops = [n.op_type for n in int8.graph.node]
    assert ops.count("MatMulInteger") >= 4 * model.config.n_layers and read_metadata(int8)["precision"] == "int8"
    ids = np.random.default_rng(0).integers(0, 64, (1, 300))
    quantized, reference = OrtRunner(int8_path, threads=2).logits(ids), runners["mixed"].logits(ids)
    error = np.abs(quantized - reference)  # quantization noise (a flipped LSH bucket moves a few rows more)
    assert 0 < error.mean() < 0.05 * np.abs(reference).mean()

    # held-out loss through `export check --reference` (bytes below 64: the model's vocabulary)
    text = "".join(f"{a}+{b}={a + b}; " for a in range(60) for b in range(0, 60, 7))
    (tmp_path / "sums.txt").write_text(text)
    prepare_corpus([str(tmp_path / "sums.txt")], str(tmp_path / "data"), val_fraction=0.5)
    args = ["export", "check", str(int8_path), "--target", "onnxruntime", "--reference", str(fp32_path),
            "--data", str(tmp_path / "data"), "--seq-len", "512", "--windows", "4", "--max-loss-increase", "2"]
    assert main(args) == 0
    assert "held-out loss over 2048 tokens" in capsys.readouterr().out


def test_export_flags_override_the_config_files_export_section(tmp_path):
    import argparse

    from reformer_dist.commands import export

    config = tmp_path / "run.yaml"
    config.write_text("train: {max_steps: 3}\nexport: {precision: fp16, lsh_sort: topk}\n")
    parser = argparse.ArgumentParser()
    export._add_onnx(parser)
    base = ["--checkpoint", "run", "--output", "m.onnx", "--config", str(config)]
    cfg = export.export_config(parser.parse_args(base))
    assert (cfg.precision, cfg.lsh_sort) == ("fp16", "topk")
    cfg = export.export_config(parser.parse_args([*base, "--precision", "fp32", "--sort", "counting"]))
    assert (cfg.precision, cfg.lsh_sort, cfg.flavour) == ("fp32", "counting", "portable")
    config.write_text("export: {precision: int8, flavour: tensorrt}\n")
    with pytest.raises(ConfigError, match=r"export\.precision"):
        export.export_config(parser.parse_args(base))


def test_cpu_sessions_leave_residual_layer_norms_unfused(tmp_path):
    """ORT's CPU SkipLayerNormalization is several times slower than Add + LayerNormalization: a CPU
    session keeps the two nodes (see ort_runner.CPU_SLOW_FUSIONS) and computes the same values."""
    from onnx import TensorProto, helper

    from reformer_dist.export.ort_runner import create_session

    d = 8
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 5, d]) for n in ("x", "skip", "y")]
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "skip"], ["sum"]),
         helper.make_node("LayerNormalization", ["sum", "w", "b"], ["y"], axis=-1, epsilon=1e-5)],
        "residual_norm", value[:2], value[2:],
        [helper.make_tensor("w", TensorProto.FLOAT, [d], np.linspace(0.5, 1.5, d, dtype=np.float32)),
         helper.make_tensor("b", TensorProto.FLOAT, [d], np.linspace(-1, 1, d, dtype=np.float32))])
    path = tmp_path / "residual_norm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)
    session = create_session(path, ["CPUExecutionProvider"], optimized_model_path=tmp_path / "optimized.onnx")
    optimized = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert "SkipLayerNormalization" not in optimized and "LayerNormalization" in optimized
    rng = np.random.default_rng(0)
    x, skip = rng.standard_normal((2, 2, 5, d), dtype=np.float32)
    y = session.run(None, {"x": x, "skip": skip})[0]
    s = x + skip
    expected = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected * np.linspace(0.5, 1.5, d) + np.linspace(-1, 1, d), atol=1e-5)

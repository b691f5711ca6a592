"""`export triton-repo`: config.pbtxt parses into Triton's ModelConfig with the right platform, dims,
batching and instance groups, for the full model and its prefill/decode companions."""

from __future__ import annotations

import sys

import onnx
import pytest
from onnx import TensorProto, helper

from reformer_dist.errors import ReformerDistError
from reformer_dist.export.triton_repo import write_triton_repo

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] is part of the test extra")
text_format = pytest.importorskip("google.protobuf.text_format")


def save_graph(path, inputs, outputs):
    """A graph of Identity/Cast nodes with the given (name, elem_type, dims) inputs and outputs."""
    nodes = [helper.make_node("Cast", [inputs[i % len(inputs)][0]], [name], to=etype)
             for i, (name, etype, _) in enumerate(outputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def read_config(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def exported(tmp_path):
    """model.onnx (logits), model.prefill.onnx (batch-leading state), model.decode.onnx (layer-leading state)."""
    d = tmp_path / "export"
    d.mkdir()
    save_graph(d / "model.onnx", [("input_ids", TensorProto.INT64, ["batch", "seq"])],
               [("logits", TensorProto.FLOAT, ["batch", "seq", 256])])
    save_graph(d / "model.prefill.onnx", [("input_ids", TensorProto.INT64, ["batch", "seq"])],
               [("logits", TensorProto.FLOAT, ["batch", 256]), ("state", TensorProto.FLOAT16, ["batch", 4, "seq", 64])])
    save_graph(d / "model.decode.onnx",
               [("input_ids", TensorProto.INT64, ["batch", 1]), ("past", TensorProto.FLOAT, [6, "batch", "past", 64])],
               [("logits", TensorProto.FLOAT, ["batch", 256]), ("present", TensorProto.FLOAT, [6, "batch", "past1", 64])])
    return d


def test_onnx_repository_has_batched_models_and_companions(exported, tmp_path):
    repo = tmp_path / "repo"
    written = write_triton_repo(exported / "model.onnx", repo, max_batch_size=16, instances=2, kind="KIND_CPU")
    assert [p.name for p in written] == ["reformer", "reformer_prefill", "reformer_decode"]
    assert (repo / "reformer" / "1" / "model.onnx").is_file()

    cfg = read_config(repo / "reformer")
    assert cfg.name == "reformer" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 16
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("input_ids", model_config_pb2.TYPE_INT64, [-1])
    (out,) = cfg.output
    assert (out.name, out.data_type, list(out.dims)) == ("logits", model_config_pb2.TYPE_FP32, [-1, 256])

    prefill = read_config(repo / "reformer_prefill")
    assert prefill.max_batch_size == 16
    assert {o.name: (o.data_type, list(o.dims)) for o in prefill.output}["state"] == (
        model_config_pb2.TYPE_FP16, [4, -1, 64])


def test_state_that_does_not_lead_with_the_batch_is_declared_unbatched(exported, tmp_path):
    write_triton_repo(exported / "model.onnx", tmp_path / "repo")
    decode = read_config(tmp_path / "repo" / "reformer_decode")
    assert decode.max_batch_size == 0
    assert not decode.HasField("dynamic_batching")
    assert {i.name: list(i.dims) for i in decode.input} == {"input_ids": [-1, 1], "past": [6, -1, -1, 64]}


def test_plan_repository_uses_the_tensorrt_platform(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on a machine without TensorRT
    (exported / "model.plan").write_bytes(b"not read without TensorRT: the sibling ONNX gives the tensors")
    write_triton_repo(exported / "model.plan", tmp_path / "repo", max_batch_size=4)
    cfg = read_config(tmp_path / "repo" / "reformer")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4
    assert (tmp_path / "repo" / "reformer" / "1" / "model.plan").is_file()


def test_rejects_unknown_model_files(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ReformerDistError, match=r"expected an \.onnx model or a TensorRT \.plan"):
        write_triton_repo(tmp_path / "model.pt", tmp_path / "repo")


def test_cli_glue_writes_the_repository(exported, tmp_path, capsys):
    import argparse

    from reformer_dist.export import triton_repo

    parser = argparse.ArgumentParser()
    triton_repo.add_arguments(parser)
    args = parser.parse_args(["--model", str(exported / "model.onnx"), "--output", str(tmp_path / "repo"),
                              "--kind", "KIND_CPU", "--instances", "3"])
    assert triton_repo.run(args) == 0
    assert "reformer_decode/config.pbtxt" in capsys.readouterr().out
    cfg = read_config(tmp_path / "repo" / "reformer")
    assert cfg.instance_group[0].count == 3

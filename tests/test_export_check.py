"""`export check`: the static check lists a graph's ops and flags what the target's importer rejects."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from reformer_dist.cli import main
from reformer_dist.export import lsh_onnx
from reformer_dist.export.check import check_model
from reformer_dist.model.lsh import LshSpec

SPEC = lsh_onnx.LshNode(LshSpec(n_hashes=2, n_buckets=(8, 4), chunk_len=4, chunks_before=1, chunks_after=0,
                                 window="bucket", causal=True), has_padding_mask=True)


def graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def planted_topk(k: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8192])
    outs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("indices", TensorProto.INT64, None)]
    return graph([helper.make_node("TopK", ["x", "k"], ["values", "indices"])], [x], outs,
                 [onnx.numpy_helper.from_array(np.array([k], dtype=np.int64), "k")])


def test_flags_a_planted_topk_with_k_4096():
    report = check_model(planted_topk(4096), "tensorrt")
    assert not report.ok
    assert [(f.op, "4096" in f.message) for f in report.errors] == [("TopK", True)]
    assert check_model(planted_topk(3839), "tensorrt").ok
    assert check_model(planted_topk(4096), "onnxruntime").ok  # ONNX Runtime has no such limit


def test_counting_sort_body_passes_and_topk_body_is_flagged_for_tensorrt():
    counting = check_model(lsh_onnx.node_model(SPEC, "counting"), "tensorrt")
    assert counting.ok, counting.format()
    # one radix counting pass (two CumSums) per digit of the bucket values, one hash argmax per bucket factor
    passes = len(SPEC.spec.counting_digits(SPEC.has_padding_mask))
    assert counting.ops["CumSum"] == 2 * passes and counting.ops["ArgMax"] == len(SPEC.spec.n_buckets)
    topk = check_model(lsh_onnx.node_model(SPEC, "topk"), "tensorrt")
    assert [f.op for f in topk.errors] == ["TopK"] and "run time" in topk.errors[0].message
    assert check_model(lsh_onnx.node_model(SPEC, "topk"), "onnxruntime").ok


def test_flags_non_constant_cumsum_axis_unsupported_ops_and_bodyless_custom_nodes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    axis = helper.make_tensor_value_info("axis", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = graph([helper.make_node("CumSum", ["x", "axis"], ["c"]), helper.make_node("Unique", ["c"], ["u"]),
                   helper.make_node("Blackbox", ["u"], ["y"], domain="acme")], [x, axis], [y])
    model.opset_import.append(helper.make_opsetid("acme", 1))
    report = check_model(model, "tensorrt")
    flagged = {(f.op, f.message.split(":")[0]) for f in report.errors}
    assert ("CumSum", "`axis` must be a build-time constant") in flagged
    assert ("Unique", "not implemented by TensorRT's ONNX parser") in flagged
    assert any(f.op == "acme::Blackbox" for f in report.errors)


def test_warns_about_reduce_log_sum_exp_overflow():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)
    model = graph([helper.make_node("ReduceLogSumExp", ["x", "axes"], ["y"])], [x], [y],
                  [onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")])
    report = check_model(model, "tensorrt")
    assert report.ok and [f.op for f in report.findings if f.level == "warning"] == ["ReduceLogSumExp"]


@pytest.mark.parametrize(("k", "code"), [(4096, 1), (16, 0)])
def test_cli_exit_status_follows_the_verdict(tmp_path, capsys, k, code):
    path = tmp_path / "m.onnx"
    onnx.save(planted_topk(k), path)
    assert main(["export", "check", str(path), "--target", "tensorrt"]) == code
    out = capsys.readouterr().out
    assert "1  TopK" in out and ("FAIL" if code else "PASS") in out

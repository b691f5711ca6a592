"""Generation graphs: ONNX Runtime prefill + decode steps give PyTorch's cached generation, token for token,
also as rows join and leave a batch; both graphs pass the TensorRT check; int8 graphs keep their LSH nodes."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.artifacts.native import save_native
from reformer_dist.cli import main
from reformer_dist.decoding import ContinuousBatcher, SamplingParams, generate, generate_stream
from reformer_dist.decoding.onnxruntime_backend import OrtBackend, open_onnxruntime
from reformer_dist.errors import ConfigError, ReformerDistError
from reformer_dist.export.check import check_model
from reformer_dist.export.generation_export import export_generation
from reformer_dist.export.metadata import generation_paths, read_metadata

GREEDY = SamplingParams(max_tokens=64, temperature=0)

pytestmark = pytest.mark.slow  # one export of three graphs (~40 s on 2 cores)

NEW_TOKENS = 64
# init 0.3: the continuation depends on the context; hash_seed: the graphs' rotations are the model's own
TINY = dict(vocab_size=48, d_model=32, n_heads=2, d_head=8, d_ff=64, lsh_chunk_len=4, local_chunk_len=4,
            lsh_n_buckets=4, lsh_n_hashes=2, max_seq_len=128, hash_seed=5, init_std=0.3)
PROMPTS = [[3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12], [1, 2, 3, 4, 5, 6]]  # different lengths: right-padded batch


def make_model(kinds: list[str], **overrides) -> ReformerLM:
    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(n_layers=len(kinds), attn_layers=kinds, **{**TINY, **overrides})).eval()


def torch_generate(model: ReformerLM, prompts: list[list[int]], n: int) -> np.ndarray:
    ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(prompt), 1
    return generate(model, ids, n, temperature=0, attention_mask=mask).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A mixed local / bucket-LSH / full model exported through the CLI with --generation."""
    work = tmp_path_factory.mktemp("generation")
    model = make_model(["local", "lsh", "full"])
    save_native(model, work / "native", tokenizer={"kind": "bytes", "offset": 0})
    out = work / "model.onnx"
    assert main(["export", "onnx", "--checkpoint", str(work / "native"), "--output", str(out), "--generation"]) == 0
    return model, out


def ort_tokens(path, prompts: list[list[int]], params: SamplingParams, **kwargs) -> np.ndarray:
    return np.stack(list(generate_stream(open_onnxruntime(path), prompts, params, **kwargs)), axis=1)


def test_ort_greedy_generation_equals_pytorch_cached_generation(exported):
    model, path = exported
    assert isinstance(open_onnxruntime(path), OrtBackend)  # cached, through the generation graphs
    np.testing.assert_array_equal(ort_tokens(path, PROMPTS, GREEDY), torch_generate(model, PROMPTS, NEW_TOKENS))


def test_rows_join_and_leave_the_ort_batch_without_changing_the_others(exported):
    _, path = exported
    backend = open_onnxruntime(path)
    prompts = {0: [3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12], 1: [1, 2, 3], 2: list(range(1, 30)), 3: [7]}
    alone = {k: ort_tokens(path, [p], SamplingParams(max_tokens=20, temperature=0))[0] for k, p in prompts.items()}
    batcher, out = ContinuousBatcher(backend), {k: [] for k in prompts}
    joins, leaves = {0: [0, 1], 3: [2], 5: [3]}, {8: 1}  # step -> who joins / leaves (before its 20 tokens)
    for step in range(30):
        logits = dict(zip(batcher.members, batcher.decode({k: out[k][-1] for k in batcher.members}))) \
            if batcher.members else {}
        if step in joins:
            logits.update(zip(joins[step], batcher.join(joins[step], [prompts[k] for k in joins[step]])))
        for k, row in logits.items():
            out[k].append(int(row.argmax()))
        batcher.leave([k for k in batcher.members if len(out[k]) == 20 or leaves.get(step) == k])
    assert len(out[1]) == 9 and out[1] == alone[1][:9].tolist()
    for k in (0, 2, 3):
        assert out[k] == alone[k].tolist(), k


def test_generation_graphs_pass_full_check_and_the_tensorrt_check(exported):
    _, path = exported
    for name, graph in generation_paths(path).items():
        proto = onnx.load(graph)
        onnx.checker.check_model(proto, full_check=True)
        meta = read_metadata(proto)
        assert meta["graph"] == name and meta["tokenizer"] == '{"kind": "bytes", "offset": 0}'
        assert meta["model_name"] == "native" or meta["model_name"] == path.parent.name
        assert main(["export", "check", str(graph), "--target", "tensorrt"]) == 0
        report = check_model(proto, "tensorrt")
        assert report.ok, report.format()
        assert "TopK" not in report.ops  # TensorRT rejects a TopK whose K is the prompt length
    decode = onnx.load(generation_paths(path)["decode"])
    assert not {n.op_type for n in decode.graph.node} & {"TopK", "LshAttention"}  # no sort, no custom node
    names = [i.name for i in decode.graph.input]
    assert names[:2] == ["token", "position"] and all(n.startswith("cache.") for n in names[2:])
    assert [o.name for o in decode.graph.output][1:] == [f"present.{n[6:]}" for n in names[2:]]
    prefill = onnx.load(generation_paths(path)["prefill"])
    assert [n.op_type for n in prefill.graph.node].count("LshAttention") == 1


@torch.no_grad()
def recomputed_greedy(model: ReformerLM, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the plain forward pass over the whole sequence, every step."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_without_generation_graphs_falls_back_to_recomputation_with_a_warning(exported, tmp_path, caplog):
    model, path = exported
    shutil.copy(path, tmp_path / "model.onnx")
    with caplog.at_level("WARNING", logger="reformer_dist.decoding"):
        backend = open_onnxruntime(tmp_path / "model.onnx")
    assert not backend.cached and "recomputes the whole sequence" in caplog.text
    tokens = np.stack(list(generate_stream(backend, PROMPTS, SamplingParams(max_tokens=12, temperature=0))), axis=1)
    assert tokens.tolist() == [recomputed_greedy(model, prompt, 12) for prompt in PROMPTS]


def test_sampling_is_seeded_and_stops_rows_at_eos(exported):
    _, path = exported
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=8, top_p=0.9, seed=3)
    run = [ort_tokens(path, PROMPTS, params) for _ in range(2)]
    np.testing.assert_array_equal(run[0], run[1])
    eos = int(run[0][0, 2])
    stopped = ort_tokens(path, PROMPTS, params, eos_token_id=eos)
    assert (stopped[0, 2:] == eos).all()


def test_request_beyond_max_seq_len_is_refused(exported):
    _, path = exported
    with pytest.raises(ConfigError, match="max_seq_len"):
        next(generate_stream(open_onnxruntime(path), [[1] * 100], SamplingParams(max_tokens=29, temperature=0)))


def test_chunk_window_lsh_is_refused_with_its_window(tmp_path):
    with pytest.raises(ReformerDistError, match="lsh_window='chunk'"):
        export_generation(make_model(["lsh"], lsh_window="chunk"), tmp_path / "model.onnx")

"""Generation graphs: ONNX Runtime prefill + decode steps give PyTorch's cached generation, token for token."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.cli import main
from reformer_dist.errors import ConfigError, ReformerDistError
from reformer_dist.export.check import check_model
from reformer_dist.export.generation_export import export_generation, generation_paths
from reformer_dist.export.metadata import read_metadata
from reformer_dist.export.ort_generate import OrtGenerator, generate_onnx, sample
from reformer_dist.model.generation import generate
from reformer_dist.model.native import save_native

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


def test_ort_greedy_generation_equals_pytorch_cached_generation(exported):
    model, path = exported
    generator = OrtGenerator(path)
    assert generator.cached
    tokens = np.stack(list(generator.stream(PROMPTS, NEW_TOKENS, temperature=0)), axis=1)
    np.testing.assert_array_equal(tokens, torch_generate(model, PROMPTS, NEW_TOKENS))


def test_generation_graphs_pass_full_check_and_decode_passes_tensorrt_check(exported):
    _, path = exported
    for name, graph in generation_paths(path).items():
        proto = onnx.load(graph)
        onnx.checker.check_model(proto, full_check=True)
        meta = read_metadata(proto)
        assert meta["graph"] == name and meta["tokenizer"] == '{"kind": "bytes", "offset": 0}'
    decode = onnx.load(generation_paths(path)["decode"])
    report = check_model(decode, "tensorrt")
    assert report.ok, report.format()
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


def test_without_generation_graphs_falls_back_to_recomputation(exported, tmp_path):
    model, path = exported
    shutil.copy(path, tmp_path / "model.onnx")
    generator = OrtGenerator(tmp_path / "model.onnx")
    assert not generator.cached
    tokens = np.stack(list(generator.stream(PROMPTS, 12, temperature=0)), axis=1)
    assert tokens.tolist() == [recomputed_greedy(model, prompt, 12) for prompt in PROMPTS]


def test_sampling_is_seeded_and_stops_rows_at_eos(exported):
    _, path = exported
    run = [np.stack(list(generate_onnx(path, PROMPTS, 16, temperature=1.0, top_k=8, top_p=0.9, seed=3)), 1)
           for _ in range(2)]
    np.testing.assert_array_equal(run[0], run[1])
    eos = int(run[0][0, 2])
    stopped = np.stack(list(generate_onnx(path, PROMPTS, 16, temperature=1.0, top_k=8, top_p=0.9, seed=3,
                                          eos_token_id=eos)), 1)
    assert (stopped[0, 2:] == eos).all()


def test_sample_restricts_to_top_k_and_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    assert {int(sample(logits, 1.0, 2, None, rng)[0]) for _ in range(200)} == {0, 1}
    assert {int(sample(logits, 1.0, None, 0.7, rng)[0]) for _ in range(200)} == {0, 1}
    assert int(sample(logits, 0.0, None, None, rng)[0]) == 0


def test_request_beyond_max_seq_len_is_refused(exported):
    _, path = exported
    with pytest.raises(ConfigError, match="max_seq_len"):
        next(generate_onnx(path, [[1] * 100], 29, temperature=0))


def test_chunk_window_lsh_is_refused_with_its_window(tmp_path):
    with pytest.raises(ReformerDistError, match="lsh_window='chunk'"):
        export_generation(make_model(["lsh"], lsh_window="chunk"), tmp_path / "model.onnx")

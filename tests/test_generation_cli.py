"""`reformer-dist generate`: the cached continuation, decoded with the checkpoint's tokenizer, on stdout."""

from __future__ import annotations

import pytest
import torch

from reformer_dist.artifacts.native import save_native
from reformer_dist.cli import main
from reformer_dist.data import get_tokenizer
from reformer_dist.decoding import generate
from reformer_dist.model import ReformerConfig, ReformerLM

CORPUS = ["the quick brown fox jumps over the lazy dog\n", "reformers hash queries into buckets\n"] * 40


def tiny_model(vocab_size: int) -> ReformerLM:
    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(vocab_size=vocab_size, d_model=32, n_heads=2, d_head=8, d_ff=64, n_layers=2,
                                     attn_layers=["local", "lsh"], lsh_chunk_len=4, local_chunk_len=4,
                                     lsh_n_buckets=4, max_seq_len=128, hash_seed=1, init_std=0.3)).eval()


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> str:
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("spm") / "spiece"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(prefix), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    return f"{prefix}.model"


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_greedy_text_on_stdout_equals_generate(kind, spm_file, tmp_path, capsys):
    spec = {"kind": "bytes", "offset": 2} if kind == "bytes" else {"kind": "sentencepiece", "path": spm_file}
    tokenizer = get_tokenizer(spec)
    model = tiny_model(tokenizer.vocab_size)
    save_native(model, tmp_path / "model", spec)
    prompt = "the lazy fox"
    assert main(["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", prompt, "--max-new-tokens", "24",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr()
    expected = generate(model, torch.tensor([tokenizer.encode(prompt)]), 24, temperature=0)[0].tolist()
    assert out.out == tokenizer.decode(expected) + "\n"
    assert "24 tokens" in out.err


def test_sampled_text_is_reproducible_with_a_seed(tmp_path, capsys):
    save_native(tiny_model(258), tmp_path / "model", {"kind": "bytes", "offset": 2})
    args = ["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", "abc", "--max-new-tokens", "16",
            "--temperature", "0.8", "--top-k", "20", "--top-p", "0.95"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]


def test_missing_tokenizer_is_a_clear_error(tmp_path, capsys):
    save_native(tiny_model(100), tmp_path / "model")
    assert main(["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", "x"]) == 2
    assert "--tokenizer" in capsys.readouterr().err

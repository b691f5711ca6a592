"""Imported checkpoints ('chunk' LSH windows) decode with HF's cached algorithm, token for token."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers 4.57.6 is the parity reference")

from test_hf_interop import random_hf_model, saved

from reformer_dist.artifacts.hf_checkpoint import from_hf
from reformer_dist.decoding import generate


@torch.no_grad()
def uncached_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, prompt.shape[1]:].tolist()


def test_chunk_window_cached_greedy_equals_hf_cached_generate(tmp_path):
    # weights of a trained model's scale, so the continuation depends on which keys the cache serves
    hf = random_hf_model(init=0.3, attn_layers=["local", "lsh", "local", "lsh"], lsh_attn_chunk_length=8,
                         num_hashes=2, axial_pos_shape=[8, 16], max_position_embeddings=128)
    ours = from_hf(saved(hf, tmp_path))
    # 5: HF attends to everything until chunk_len tokens, then hashes them all;
    # 21: the prompt is padded inside HF's prefill, whose cached buckets then carry the padding offset
    for length in (5, 21):
        prompt = torch.randint(3, 40, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = hf.generate(prompt, max_new_tokens=64, do_sample=False, use_cache=True, pad_token_id=0,
                                   eos_token_id=None)[0, length:].tolist()
        assert generate(ours, prompt, 64, temperature=0)[0].tolist() == expected, length
    # the chunk boundaries really moved: a cache that recomputed the sequence would fail this test
    assert uncached_greedy(ours, prompt, 64) != expected

    # a batch decodes every row as if alone (HF's own batched cache reads every row's states from row 0)
    batch = torch.randint(3, 40, (2, 21), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        alone = [hf.generate(row[None], max_new_tokens=32, do_sample=False, use_cache=True, pad_token_id=0,
                             eos_token_id=None)[0, 21:].tolist() for row in batch]
    assert generate(ours, batch, 32, temperature=0).tolist() == alone

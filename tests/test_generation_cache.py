"""Cached generation (prefill + decode_step) equals recomputing the whole sequence every step."""

from __future__ import annotations

import pytest
import torch

from reformer_dist.decoding import generate
from reformer_dist.errors import ConfigError
from reformer_dist.model import ReformerConfig, ReformerLM
from reformer_dist.model.generation import decode_step, prefill

NEW_TOKENS = 64
# Weights large enough (init 0.3) that the continuation depends on the context, not just the last token.
BASE = dict(vocab_size=48, d_model=32, n_heads=2, d_head=8, d_ff=64, lsh_chunk_len=4, local_chunk_len=4,
            lsh_n_buckets=4, lsh_n_hashes=2, max_seq_len=128, hash_seed=5, init_std=0.3)


def make_model(kinds: list[str], **overrides) -> ReformerLM:
    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(n_layers=len(kinds), attn_layers=kinds, **{**BASE, **overrides})).eval()


@torch.no_grad()
def uncached_greedy(model: ReformerLM, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and last-position logits, recomputing the whole sequence for every token."""
    seq, tokens, logits = prompt[None], [], []
    for _ in range(n):
        last = model(seq)[0, -1]
        logits.append(last)
        tokens.append(int(last.argmax()))
        seq = torch.cat([seq, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, logits


def padded_batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 48, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("kinds", [["local", "lsh", "full"], ["lsh", "lsh"]], ids=["local_lsh_full", "lsh_bucket"])
def test_cached_greedy_equals_uncached_for_padded_batch(kinds):
    model = make_model(kinds)
    lengths = [11, 6]
    ids, mask = padded_batch(lengths)
    cached = generate(model, ids, NEW_TOKENS, temperature=0, attention_mask=mask)
    reference = [uncached_greedy(model, ids[row, :n], NEW_TOKENS) for row, n in enumerate(lengths)]
    for row, (tokens, _) in enumerate(reference):
        assert cached[row].tolist() == tokens, row
    # every step's last-position logits, driving the batch cache with the reference tokens
    with torch.no_grad():
        logits, cache = prefill(model, ids, mask, None, max(lengths) + NEW_TOKENS)
        for t in range(NEW_TOKENS):
            for row, (_, expected) in enumerate(reference):
                assert (logits[row] - expected[t]).abs().max().item() <= 1e-5, (row, t)
            tokens = torch.tensor([reference[row][0][t] for row in range(len(lengths))])
            logits, cache = decode_step(model, tokens, torch.tensor(lengths) + t, cache)


def test_cache_sizes_are_bounded():
    model = make_model(["local", "lsh", "full"], local_chunks_before=1)
    ids = torch.randint(0, 48, (1, 40))
    with torch.no_grad():
        _, cache = prefill(model, ids, None, None, max_len=100, max_cache_len=16)
        for t in range(3):
            _, cache = decode_step(model, torch.tensor([1]), torch.tensor([40 + t]), cache)
    assert cache["0.k"].shape[2] == 2 * 4  # local: (chunks_before + 1) * chunk_len
    assert cache["1.k"].shape[3] == 4 * 5  # lsh bucket window: n_buckets * (chunk_len + 1) per round
    assert cache["2.k"].shape[2] == 16  # full: max_cache_len
    assert int(cache["1.count"].sum()) == 43 * 2 * 2  # every token counted once per head and round


def test_full_cache_bound_keeps_the_most_recent_tokens():
    model = make_model(["full"])
    ids = torch.randint(0, 48, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, bounded = prefill(model, ids, None, None, max_len=40, max_cache_len=8)
        _, whole = prefill(model, ids, None, None, max_len=40)
        _, stepped = decode_step(model, torch.tensor([5]), torch.tensor([30]), bounded)
    pos = bounded["0.pos"][0]
    assert sorted(pos.tolist()) == list(range(22, 30))
    assert torch.equal(bounded["0.v"], whole["0.v"][:, :, pos])  # slot s holds position pos[s]
    assert sorted(stepped["0.pos"][0].tolist()) == list(range(23, 31))  # the oldest made room


def test_sampling_is_reproducible_and_private():
    model = make_model(["local", "lsh"])
    ids = torch.randint(0, 48, (2, 9))
    state = torch.get_rng_state()
    a = generate(model, ids, 12, temperature=1.0, top_k=10, top_p=0.9, seed=123)
    b = generate(model, ids, 12, temperature=1.0, top_k=10, top_p=0.9, seed=123)
    c = generate(model, ids, 12, temperature=1.0, top_k=10, top_p=0.9, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was neither read nor advanced
    greedy = generate(model, ids, 12, temperature=0)
    assert torch.equal(generate(model, ids, 12, temperature=0.7, top_k=1, seed=5), greedy)
    assert torch.equal(generate(model, ids, 12, temperature=0.7, top_p=1e-6, seed=5), greedy)


def test_generation_stops_at_eos_and_repeats_it():
    model = make_model(["local", "lsh"])
    ids = torch.randint(0, 48, (2, 7), generator=torch.Generator().manual_seed(4))
    free = generate(model, ids, 16, temperature=0)
    eos = int(free[0, 3])
    stopped = generate(model, ids, 16, temperature=0, eos_token_id=eos)
    first = [row.tolist().index(eos) if eos in row.tolist() else None for row in free]
    if all(f is not None for f in first):
        assert stopped.shape[1] == max(first) + 1
    for row, f in enumerate(first):
        if f is not None:
            assert stopped[row, : f + 1].tolist() == free[row, : f + 1].tolist()
            assert set(stopped[row, f:].tolist()) == {eos}


def test_rotations_without_hash_seed_come_from_the_model():
    model = make_model(["lsh", "lsh"], hash_seed=None)
    ids = torch.randint(0, 48, (1, 10))
    rotations = model.draw_rotations(9)
    with torch.no_grad():
        _, cache = prefill(model, ids, None, rotations, max_len=20)
    assert torch.equal(cache["0.rot"], rotations[0]) and not torch.equal(rotations[0], rotations[1])
    # decoding uses the model's one draw whatever the sampling seed, and freezing records that draw
    a = generate(model, ids, 10, temperature=0, seed=1)
    assert torch.equal(a, generate(model, ids, 10, temperature=0, seed=2))
    default = model.draw_rotations()
    model.freeze_rotations()
    assert all(torch.equal(x, y) for x, y in zip(model.draw_rotations(9), default))  # frozen: seed ignored
    assert torch.equal(generate(model, ids, 10, temperature=0), a)
    with torch.no_grad():  # every forward of a frozen model hashes alike
        assert torch.equal(model(ids), model(ids))
    model.unfreeze_rotations()
    assert model.layers[0].attention.self_attention.frozen_rotations is None


@pytest.mark.parametrize(("kwargs", "key"), [
    (dict(max_new_tokens=200), "max_new_tokens"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])), "attention_mask"),
])
def test_bad_requests_name_the_argument(kwargs, key):
    with pytest.raises(ConfigError) as err:
        generate(make_model(["local"]), torch.randint(0, 48, (1, 8)), **kwargs)
    assert err.value.key == key


def test_bidirectional_models_cannot_generate():
    with pytest.raises(ConfigError) as err:
        generate(make_model(["local"], causal=False), torch.randint(0, 48, (1, 8)), 4)
    assert err.value.key == "model.causal"


@pytest.mark.parametrize("window", ["bucket", "chunk"])
def test_prefill_and_decode_step_trace_with_torch_export(window):
    """No .item() and no Python branch on tensor values: torch.export captures both as graphs."""
    kinds = ["local", "lsh", "full"] if window == "bucket" else ["local", "lsh"]
    model = make_model(kinds, lsh_window=window)
    ids, mask = padded_batch([9, 5])
    rotations = model.draw_rotations()

    class Prefill(torch.nn.Module):
        def forward(self, ids, mask, rotations):
            return prefill(model, ids, mask, rotations, 40)

    class Step(torch.nn.Module):
        def forward(self, token, position, cache):
            return decode_step(model, token, position, cache)

    with torch.no_grad():
        logits, cache = prefill(model, ids, mask, rotations, 40)
        exported = torch.export.export(Prefill(), (ids, mask, rotations), strict=False).module()
        assert torch.equal(exported(ids, mask, rotations)[0], logits)
        args = (torch.tensor([3, 4]), torch.tensor([9, 5]), cache)
        exported = torch.export.export(Step(), args, strict=False).module()
        assert torch.equal(exported(*args)[0], decode_step(model, *args)[0])


@pytest.mark.parametrize("buckets", [4, [2, 4], 64], ids=["one_factor", "factorised", "two_counting_passes"])
def test_counting_layout_of_the_bucket_cache_equals_the_sorted_one(buckets):
    """The exported prefill's TensorRT-legal layout (radix counting) builds the very cache sorting builds."""
    model = make_model(["lsh", "local"], lsh_chunk_len=2, lsh_n_buckets=buckets)  # short rings overflow and wrap
    ids, mask = padded_batch([23, 14])
    with torch.no_grad():
        logits, sorted_cache = prefill(model, ids, mask, None, 40)
        counted_logits, counted_cache = prefill(model, ids, mask, None, 40, counting=True)
    assert torch.equal(logits, counted_logits)
    assert sorted_cache.keys() == counted_cache.keys()
    for key in sorted_cache:
        assert torch.equal(sorted_cache[key], counted_cache[key]), key

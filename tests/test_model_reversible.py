"""Reversible stack: gradients equal the plain residual stack's; randomness is private and replayable."""

from __future__ import annotations

import torch

from reformer_dist import ReformerConfig, ReformerLM


def config(**overrides) -> ReformerConfig:
    fields = dict(vocab_size=40, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=3,
                  attn_layers=["lsh", "local", "full"], lsh_chunk_len=8, local_chunk_len=8, lsh_n_buckets=[4, 2],
                  lsh_n_hashes=2, max_seq_len=64, dropout=0.1, attn_dropout=0.1, ff_chunk_size=16,
                  loss_chunk_size=24)
    fields.update(overrides)
    return ReformerConfig(**fields)


def batch(length=61):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 40, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, 50:] = False
    targets = torch.randint(0, 40, (2, length), generator=g).masked_fill(~mask, -100)
    return ids, targets, mask


def grads_and_loss(model: ReformerLM):
    ids, targets, mask = batch()
    model.zero_grad()
    loss = model.loss(ids, targets, attention_mask=mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def twins(window: str) -> tuple[ReformerLM, ReformerLM]:
    """A reversible model and its plain-residual twin: same weights, same private random streams."""
    torch.manual_seed(0)
    rev = ReformerLM(config(lsh_window=window)).train()
    plain = ReformerLM(config(lsh_window=window, reversible=False)).train()
    plain.load_state_dict(rev.state_dict())
    plain.set_rng_state(rev.rng_state())
    return rev, plain


def test_reversible_gradients_equal_plain_residual_gradients_with_dropout():
    for window in ("bucket", "chunk"):
        rev, plain = twins(window)
        loss_r, g_r = grads_and_loss(rev)
        loss_p, g_p = grads_and_loss(plain)
        assert torch.equal(loss_r, loss_p)
        worst = max(((g_r[n] - g_p[n]).norm() / g_p[n].norm().clamp(min=1e-30)).item() for n in g_p)
        print(f"{window}: max relative grad difference reversible vs plain = {worst:.2e}")
        assert worst <= 1e-5
        # and both consumed their private randomness identically
        assert all(torch.equal(a, b) for a, b in zip(rev.rng_state().values(), plain.rng_state().values()))


def test_same_seed_gives_bitwise_equal_loss_and_grads_and_leaves_global_rng_alone():
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = ReformerLM(config()).train()
        before = torch.get_rng_state()
        runs.append(grads_and_loss(model))
        assert torch.equal(torch.get_rng_state(), before), "forward/backward touched the global RNG"
    (loss_a, g_a), (loss_b, g_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(g_a[n], g_b[n]) for n in g_a)


def test_rng_state_round_trip_resumes_exactly_and_reseed_is_deterministic():
    torch.manual_seed(0)
    model = ReformerLM(config()).train()
    state = model.rng_state()
    first, _ = grads_and_loss(model)
    second, _ = grads_and_loss(model)
    assert not torch.equal(first, second)  # fresh dropout masks and rotations per step
    model.set_rng_state(state)
    again, _ = grads_and_loss(model)
    assert torch.equal(first, again)
    model.reseed(7)
    a, _ = grads_and_loss(model)
    model.reseed(7)
    b, _ = grads_and_loss(model)
    assert torch.equal(a, b)


def test_recompute_calls_submodules_through_their_hooks():
    """ZeRO-3 gathers parameters in module pre-hooks: the backward recompute must trigger them."""
    torch.manual_seed(0)
    model = ReformerLM(config(ff_chunk_size=0)).train()
    calls = {"attention": 0, "feed_forward": 0}
    for layer in model.layers:
        layer.attention.self_attention.register_forward_pre_hook(lambda *_: calls.__setitem__(
            "attention", calls["attention"] + 1))
        layer.feed_forward.dense.register_forward_pre_hook(lambda *_: calls.__setitem__(
            "feed_forward", calls["feed_forward"] + 1))
    grads_and_loss(model)
    assert calls == {"attention": 6, "feed_forward": 6}  # 3 layers x (forward + recompute)


def test_autocast_bf16_reversible_matches_plain_and_keeps_fp32_streams():
    torch.manual_seed(0)
    rev = ReformerLM(config(dropout=0.0, attn_dropout=0.0)).train()
    plain = ReformerLM(config(dropout=0.0, attn_dropout=0.0, reversible=False)).train()
    plain.load_state_dict(rev.state_dict())
    plain.set_rng_state(rev.rng_state())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_r, g_r = grads_and_loss(rev)
        loss_p, g_p = grads_and_loss(plain)
    assert loss_r.dtype == torch.float32 and torch.equal(loss_r, loss_p)
    worst = max(((g_r[n] - g_p[n]).norm() / g_p[n].norm().clamp(min=1e-30)).item() for n in g_p)
    assert worst <= 2e-2, worst  # bf16 recompute replays autocast; differences are bf16 rounding of x2 = y2 - G


def _saved_bytes(model: ReformerLM) -> int:
    """Bytes autograd keeps for the backward after one forward (distinct storages)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids, targets, _ = batch(64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(ids, targets)
    return sum(storages.values())


def test_saved_activations_do_not_grow_with_depth_when_reversible():
    sizes = {}
    for reversible in (True, False):
        for n_layers in (3, 9):
            torch.manual_seed(0)
            model = ReformerLM(config(n_layers=n_layers, reversible=reversible)).train()
            sizes[reversible, n_layers] = _saved_bytes(model)
    assert sizes[True, 9] == sizes[True, 3]
    assert sizes[False, 9] > 2 * sizes[False, 3]  # the plain stack stores every layer's activations


def test_head_groups_and_position_tiles_keep_gradients_exact_and_tell_the_tile_hook(monkeypatch):
    from reformer_dist.model import reversible

    monkeypatch.setattr(reversible, "HEAD_GROUP_ELEMENTS", 1)  # one head per group at any length
    for window in ("bucket", "chunk"):
        rev, plain = twins(window)
        names = {id(p): n for n, p in rev.named_parameters()}
        calls: list[tuple[list[str], bool]] = []
        rev.set_tile_hook(lambda params, last, calls=calls, names=names:
                          calls.append(([names[id(p)] for p in params], last)))
        loss_r, g_r = grads_and_loss(rev)
        loss_p, g_p = grads_and_loss(plain)
        assert abs(loss_r - loss_p) <= 1e-6
        worst = max(((g_r[n] - g_p[n]).norm() / g_p[n].norm().clamp(min=1e-30)).item() for n in g_p)
        assert worst <= 1e-5, worst
        # every parameter but the embeddings' is told "last" exactly once: on the last of the tiles that
        # accumulate into it (per layer 4 position tiles of 16 for the feed-forward, and per head group for
        # the attention's output projection and for its LayerNorm + input projections; 3 loss chunks of 24
        # for the head)
        tiles_of: dict[str, list[bool]] = {}
        for params, last in calls:
            for name in params:
                tiles_of.setdefault(name, []).append(last)
        assert sorted(tiles_of) == sorted(n for n in names.values() if not n.startswith("embeddings."))
        for name, marks in tiles_of.items():
            tiles = 3 if not name.startswith("layers.") else 4 if ".feed_forward." in name else 8
            assert marks == [False] * (tiles - 1) + [True], (name, marks)

"""ReformerLM public API: shapes, padding, the chunked loss, precision, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.errors import ConfigError, ReformerDistError


def config(**overrides) -> ReformerConfig:
    fields = dict(vocab_size=40, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=2, attn_layers=["lsh", "local"],
                  lsh_chunk_len=8, local_chunk_len=16, lsh_n_buckets=[4, 2], max_seq_len=96)
    fields.update(overrides)
    return ReformerConfig(**fields)


def test_public_api_shapes_for_odd_lengths():
    torch.manual_seed(0)
    model = ReformerLM(config()).eval()
    for length in (1, 7, 17, 33, 96):
        ids = torch.randint(0, 40, (3, length))
        assert model(ids).shape == (3, length, 40)
        assert model.hidden_states(ids).shape == (3, length, 64)


@pytest.mark.parametrize("kinds", [["lsh", "local"], ["full"]])
def test_real_token_logits_do_not_depend_on_the_padding_that_follows(kinds):
    torch.manual_seed(0)
    model = ReformerLM(config(attn_layers=kinds, n_layers=2 if len(kinds) == 2 else 1, hash_seed=1)).eval()
    ids = torch.randint(0, 40, (2, 37))
    reference = model(ids)
    for total in (40, 64, 90):
        padded = torch.cat([ids, torch.randint(0, 40, (2, total - 37))], dim=1)  # junk after the real tokens
        mask = torch.zeros(2, total, dtype=torch.bool)
        mask[:, :37] = True
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, :37], reference, atol=1e-6, rtol=0)


def test_chunked_loss_equals_plain_cross_entropy_and_ignores_minus_100():
    torch.manual_seed(0)
    model = ReformerLM(config(loss_chunk_size=10, hash_seed=2)).eval()
    ids = torch.randint(0, 40, (2, 45))
    targets = torch.randint(0, 40, (2, 45))
    targets[0, :5] = -100
    expected = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(model.loss(ids, targets), expected, atol=1e-6, rtol=1e-6)
    # gradients through the chunks recomputed in the backward equal those of the whole-logits loss
    model.zero_grad()
    model.loss(ids, targets).backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(chunked[n], p.grad, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_forward_backward_is_finite_at_4k_tokens():
    torch.manual_seed(0)
    model = ReformerLM(config(max_seq_len=4096, lsh_chunk_len=64, local_chunk_len=64, lsh_n_buckets=None,
                              ff_chunk_size=1024, loss_chunk_size=1024, dropout=0.1, attn_dropout=0.1)).train()
    ids = torch.randint(0, 40, (1, 4096))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(ids, ids)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_too_long_input_and_bad_config_are_user_errors():
    model = ReformerLM(config(max_seq_len=32))
    with pytest.raises(ReformerDistError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"model\.attn_layers"):
        ReformerLM(config(attn_layers=["sparse"]))


def test_constructing_with_the_same_global_seed_gives_the_same_model_and_streams():
    torch.manual_seed(4)
    a = ReformerLM(config())
    torch.manual_seed(4)
    b = ReformerLM(config())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert all(torch.equal(x, y) for x, y in zip(a.rng_state().values(), b.rng_state().values()))

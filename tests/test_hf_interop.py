"""HF Reformer checkpoints load into ReformerLM with HF's numbers, and save back unchanged.

Reference: transformers 4.57.6 (5.x drops the LM-head bias from the logits). Hub downloads are impossible
here, so every test builds a small random ``ReformerModelWithLMHead``, saves it with ``save_pretrained``
and converts the directory.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers 4.57.6 is the parity reference")

from reformer_dist.artifacts.hf_checkpoint import from_hf, save_hf  # noqa: E402
from reformer_dist.errors import CheckpointError, ConfigError  # noqa: E402
from reformer_dist.model import ReformerConfig, ReformerLM  # noqa: E402
from reformer_dist.model.hf_mapping import HF_FIELD_OF, config_from_hf, hf_auto_buckets, hf_name  # noqa: E402

transformers.logging.set_verbosity_error()

BASE = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, attention_head_size=8, feed_forward_size=32,
            lsh_attn_chunk_length=4, local_attn_chunk_length=4, num_buckets=4, num_hashes=2,
            axial_pos_shape=[4, 8], axial_pos_embds_dim=[8, 8], max_position_embeddings=32, is_decoder=True,
            hash_seed=7, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0, pad_token_id=0, eos_token_id=2)

CONFIGS = {
    "lsh_only": dict(attn_layers=["lsh", "lsh"], num_hashes=1),
    "local_only": dict(attn_layers=["local", "local"]),
    "mixed": dict(attn_layers=["local", "lsh", "local", "lsh"], lsh_attn_chunk_length=8),
    "factorised_buckets": dict(attn_layers=["lsh", "local"], num_buckets=[2, 4]),
    "several_hashes": dict(attn_layers=["lsh", "lsh"], num_hashes=4, num_buckets=8, hidden_act="gelu_new"),
    # look-back wider than short sequences: HF's windows wrap around and repeat chunks, ours must too
    "wide_windows": dict(attn_layers=["local", "lsh"], local_num_chunks_before=2, lsh_num_chunks_before=3),
}


def random_hf_model(init: float = 0.02, model_class: str = "ReformerModelWithLMHead", **overrides):
    """A random HF Reformer: HF's own init (weights ~ N(0, init)), plus random LayerNorm affines and
    LM-head bias so that a mix-up of any of them shows in the logits."""
    torch.manual_seed(0)
    config = transformers.ReformerConfig(**{**BASE, "initializer_range": init, **overrides})
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.bias.normal_(0, 0.5)
    return model.eval()


def saved(model, tmp_path, name="hf", **kwargs):
    path = tmp_path / name
    model.save_pretrained(path, **kwargs)
    return path


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_equal_hf(name, tmp_path):
    hf = random_hf_model(**CONFIGS[name])
    ours = from_hf(saved(hf, tmp_path))
    assert ours.config.lsh_window == "chunk" and ours.config.causal
    torch.manual_seed(1)
    for length in (3, 8, 13, 32):  # within one chunk, a multiple, padded inside the model, the full table
        ids = torch.randint(0, 40, (2, length))
        with torch.no_grad():
            expected, got = hf(ids).logits, ours(ids)
        assert (got - expected).abs().max().item() <= 1e-5, (name, length)


def test_masked_lm_checkpoint_loads_bidirectional(tmp_path):
    hf = random_hf_model(model_class="ReformerForMaskedLM", attn_layers=["local", "lsh"], is_decoder=False)
    ours = from_hf(saved(hf, tmp_path))
    assert not ours.config.causal
    ids = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_and_gradients_equal_hf(name, tmp_path):
    hf = random_hf_model(**CONFIGS[name])
    ours = from_hf(saved(hf, tmp_path))
    hf.train()
    ours.train()
    ids = torch.randint(0, 40, (2, 32), generator=torch.Generator().manual_seed(2))  # HF trains at prod(axial)
    hf_loss = hf(ids, labels=ids).loss
    hf_loss.backward()
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # HF shifts the labels inside
    loss = ours.loss(ids, targets)
    loss.backward()
    assert abs(loss.item() - hf_loss.item()) <= 1e-5 * abs(hf_loss.item())
    hf_params = dict(hf.named_parameters())
    for our_name, p in ours.named_parameters():
        expected = hf_params[hf_name(our_name)].grad.reshape(p.shape)
        assert max_rel(p.grad, expected) <= 1e-5, our_name


def test_logits_equal_hf_at_trained_weight_scale(tmp_path):
    """Weights as large as a trained checkpoint's make HF's fp32 rounding visible: at the -1e5 self-mask
    scale its softmax ``exp(s - logsumexp(s))`` and round weights ``exp(lse - logsumexp(lse))`` do not sum
    to 1 (a token seeing only copies of itself gets ~0.997 of its value). Parity needs the same rounding."""
    hf = random_hf_model(init=0.3, attn_layers=["local", "lsh", "lsh"])
    ours = from_hf(saved(hf, tmp_path))
    for length in (3, 13, 32):
        ids = torch.randint(0, 40, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected, got = hf(ids).logits, ours(ids)
        assert max_rel(got, expected) <= 1e-5, length


def test_round_trip_hf_ours_hf_is_identical(tmp_path):
    hf = random_hf_model(**CONFIGS["mixed"])
    ours = from_hf(saved(hf, tmp_path))
    save_hf(ours, tmp_path / "back")
    back = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "back").eval()
    original, restored = hf.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    ids = torch.randint(0, 40, (2, 19))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    for field in set(HF_FIELD_OF.values()):
        assert getattr(back.config, field) == getattr(hf.config, field), field


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    hf = random_hf_model(**CONFIGS["mixed"])
    path = saved(hf, tmp_path, safe_serialization=False)
    assert (path / "pytorch_model.bin").is_file() and not (path / "model.safetensors").exists()
    ids = torch.randint(0, 40, (1, 13))
    with torch.no_grad():
        assert (from_hf(path)(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_automatic_buckets_resolve_as_hf_does_at_max_length(tmp_path):
    hf = random_hf_model(attn_layers=["lsh", "local"], num_buckets=None, max_position_embeddings=32)
    ours = from_hf(saved(hf, tmp_path))
    ids = torch.randint(0, 40, (1, 32))
    with torch.no_grad():
        expected = hf(ids).logits  # HF picks its bucket count at this first forward (length 32)
    resolved = hf.reformer.encoder.layers[0].attention.self_attention.num_buckets
    assert ours.config.lsh_n_buckets == resolved == hf_auto_buckets(32, 4)
    with torch.no_grad():
        assert (ours(ids) - expected).abs().max().item() <= 1e-5
    assert hf_auto_buckets(65536, 256) == 512  # google/reformer-enwik8's explicit value
    assert hf_auto_buckets(2**19, 64) == [128, 128]  # large counts are factorised


def test_hash_seed_rotations_equal_hf_global_seeded_draw():
    layer = ReformerLM(ReformerConfig(d_model=16, n_heads=2, d_head=8, d_ff=32, n_layers=1, attn_layers=["lsh"],
                                      lsh_n_buckets=[4, 8], lsh_n_hashes=3, hash_seed=11, max_seq_len=64)
                       ).layers[0].attention.self_attention
    ours = layer.rotations(torch.Generator().manual_seed(999), torch.device("cpu"))
    torch.manual_seed(11)  # what HF's _hash_vectors does before drawing
    expected = torch.randn((2, 8, 3, (4 + 8) // 2))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(("field", "value"), [
    ("hidden_act", "tanh"),
    ("architectures", ["ReformerForSequenceClassification"]),
    ("axial_pos_embds", False),
    ("tie_word_embeddings", True),
    ("attn_layers", ["lsh", "full"]),
    ("num_buckets", 5),
    ("axial_pos_embds_dim", [8, 4]),
])
def test_unsupported_hf_config_names_the_field(field, value):
    hf = random_hf_model(attn_layers=["lsh", "local"]).config.to_dict()
    hf[field] = value
    with pytest.raises(ConfigError) as err:
        config_from_hf(hf)
    assert err.value.key == field


def test_every_config_field_maps_from_an_hf_field():
    from dataclasses import fields

    unmapped = {f.name for f in fields(ReformerConfig)} - set(HF_FIELD_OF)
    assert unmapped == {"lsh_window", "reversible"}  # fixed by the import: 'chunk', reversible like HF


def test_save_hf_refuses_what_hf_cannot_run(tmp_path):
    base = dict(d_model=16, n_heads=2, d_head=8, d_ff=32, n_layers=2, max_seq_len=64, lsh_n_buckets=4)
    with pytest.raises(ConfigError) as err:
        save_hf(ReformerLM(ReformerConfig(attn_layers=["lsh"], lsh_window="bucket", **base)), tmp_path / "a")
    assert err.value.key == "model.lsh_window"
    with pytest.raises(ConfigError) as err:
        save_hf(ReformerLM(ReformerConfig(attn_layers=["local", "full"], **base)), tmp_path / "b")
    assert err.value.key == "model.attn_layers"
    assert not (tmp_path / "a" / "config.json").exists()


def test_weights_that_do_not_match_the_config_are_rejected(tmp_path):
    path = saved(random_hf_model(attn_layers=["lsh", "local"]), tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["feed_forward_size"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="feed_forward"):
        from_hf(path)

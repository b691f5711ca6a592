"""Hugging Face's Reformer <-> ReformerLM: how HF's config fields and weight names map onto ours.

This is knowledge of the two architectures, not of files: ``config_from_hf`` / ``config_to_hf`` translate
a ``config.json`` dict, ``state_dict_from_hf`` / ``state_dict_to_hf`` rename and reshape tensors. An HF
model's LSH layers become the reference ``chunk`` window, so its logits equal HF's. Reading and writing
HF model directories (``from_hf`` / ``save_hf``) is ``reformer_dist.artifacts.hf_checkpoint``'s.

Parity reference: transformers **4.57.6**. transformers 5.x still ships Reformer, but its
``ReformerOnlyLMHead`` no longer adds the LM-head bias to the logits (4.x ties ``decoder.bias`` to
``lm_head.bias``), so a checkpoint with a non-zero bias gives different logits under 5.x. We follow 4.x:
the bias is applied. Writing a checkpoint for 5.x users changes nothing on disk; their logits just lack
the bias.

Config mapping (HF field -> ReformerConfig field): ``hidden_size -> d_model``, ``num_attention_heads ->
n_heads``, ``attention_head_size -> d_head``, ``feed_forward_size -> d_ff``, ``attn_layers -> attn_layers``
(and ``n_layers = len``), ``lsh_attn_chunk_length -> lsh_chunk_len``, ``num_hashes -> lsh_n_hashes``,
``num_buckets -> lsh_n_buckets`` (int or factor list; HF's ``null`` means "choose at the first forward from
its length": we resolve it with HF's own rule at ``max_position_embeddings`` and write the result back
explicitly), ``lsh/local_num_chunks_before/after``, ``local_attn_chunk_length``, ``is_decoder -> causal``,
``hash_seed``, ``hidden_dropout_prob -> dropout``, ``lsh_attention_probs_dropout_prob -> attn_dropout``,
``local_attention_probs_dropout_prob -> local_attn_dropout``, ``layer_norm_eps``, ``hidden_act ->
activation``, ``max_position_embeddings -> max_seq_len``, ``axial_pos_shape/axial_pos_embds_dim/
axial_norm_std``, ``chunk_size_feed_forward -> ff_chunk_size``, ``initializer_range -> init_std``,
``pad_token_id``. ``chunk_size_lm_head`` only splits HF's head computation into pieces (same numbers), so
it maps to ``loss_chunk_size`` when set; we always write 0 back because HF demands the sequence length be
a multiple of it. What the model cannot represent raises :class:`ConfigError` naming the HF field.

Weights: the same tensors under other names (``attention.output.dense`` -> ``attention.output``,
``feed_forward.dense.dense`` -> ``feed_forward.dense``, ``reformer.encoder.layer_norm`` (width
2*d_model) -> ``final_norm``, ``lm_head.decoder`` + ``lm_head.bias`` -> ``lm_head``); HF stores axis i of
the axial positions as ``(1, .., n_i, .., 1, d_i)``, we store ``(n_i, d_i)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from reformer_dist.errors import CheckpointError, ConfigError
from reformer_dist.model.config import ReformerConfig

if TYPE_CHECKING:
    from reformer_dist.model.reformer import ReformerLM

# HF hidden_act -> our activation. HF's "gelu" is the exact erf form, "gelu_new" / "gelu_pytorch_tanh"
# the tanh approximation, "swish" is SiLU.
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new",
                  "silu": "silu", "swish": "silu"}
# HF architecture -> causal (ReformerModelWithLMHead requires is_decoder, ReformerForMaskedLM forbids it).
HF_ARCHITECTURES = {"ReformerModelWithLMHead": True, "ReformerForMaskedLM": False}
# ReformerConfig field -> the HF field it comes from (to name HF fields in validation errors).
HF_FIELD_OF = {
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_heads": "num_attention_heads",
    "d_head": "attention_head_size", "d_ff": "feed_forward_size", "n_layers": "attn_layers",
    "attn_layers": "attn_layers", "lsh_chunk_len": "lsh_attn_chunk_length", "lsh_n_hashes": "num_hashes",
    "lsh_n_buckets": "num_buckets", "lsh_chunks_before": "lsh_num_chunks_before",
    "lsh_chunks_after": "lsh_num_chunks_after", "local_chunk_len": "local_attn_chunk_length",
    "local_chunks_before": "local_num_chunks_before", "local_chunks_after": "local_num_chunks_after",
    "causal": "is_decoder", "dropout": "hidden_dropout_prob", "attn_dropout": "lsh_attention_probs_dropout_prob",
    "local_attn_dropout": "local_attention_probs_dropout_prob", "max_seq_len": "max_position_embeddings",
    "axial_pos_shape": "axial_pos_shape", "axial_pos_dims": "axial_pos_embds_dim",
    "axial_norm_std": "axial_norm_std", "ff_chunk_size": "chunk_size_feed_forward",
    "loss_chunk_size": "chunk_size_lm_head", "hash_seed": "hash_seed", "layer_norm_eps": "layer_norm_eps",
    "activation": "hidden_act", "init_std": "initializer_range", "pad_token_id": "pad_token_id",
}


# ---------------------------------------------------------------------------------------- config
def hf_auto_buckets(max_len: int, chunk_len: int) -> int | list[int]:
    """HF's ``LSHSelfAttention._set_num_buckets`` at sequence length ``max_len``: the power of two
    nearest below ``2 * (max_len // chunk_len)``, split into two factors above its size limit."""
    power = (2 * (max_len // chunk_len)).bit_length() - 1
    limit = 2 * max(int((max_len // chunk_len) ** 0.5), chunk_len)
    if 2**power > limit:
        return [2 ** (power // 2), 2 ** (power - power // 2)]
    return 2**power


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ReformerConfig:
    """Our config for an HF Reformer ``config.json`` (a dict); ConfigError names the HF field at fault."""

    def bad(field: str, reason: str) -> ConfigError:
        return ConfigError(field, f"{reason} (in {source})")

    if hf.get("model_type", "reformer") != "reformer":
        raise bad("model_type", f"is {hf.get('model_type')!r}, not a Reformer checkpoint")
    archs = hf.get("architectures") or ["ReformerModelWithLMHead"]
    if len(archs) != 1 or archs[0] not in HF_ARCHITECTURES:
        raise bad("architectures", f"{archs} is not supported: only a language-model head "
                                   f"({' or '.join(HF_ARCHITECTURES)}) maps to ReformerLM")
    causal = bool(hf.get("is_decoder", False))
    if causal != HF_ARCHITECTURES[archs[0]]:
        raise bad("is_decoder", f"{archs[0]} needs is_decoder={HF_ARCHITECTURES[archs[0]]}")
    if not hf.get("axial_pos_embds", True):
        raise bad("axial_pos_embds", "only axial position embeddings are supported")
    if hf.get("tie_word_embeddings", False):
        raise bad("tie_word_embeddings", "the LM head reads 2*hidden_size features; it cannot be tied to "
                                         "the hidden_size-wide input embeddings")
    act = hf.get("hidden_act", "relu")
    if not isinstance(act, str) or act not in HF_ACTIVATIONS:
        raise bad("hidden_act", f"activation {act!r} is not supported; choose from {sorted(HF_ACTIVATIONS)}")
    layers = list(hf.get("attn_layers") or [])
    if not layers or any(kind not in ("lsh", "local") for kind in layers):
        raise bad("attn_layers", f"must be a non-empty list of 'lsh'/'local', got {layers}")
    for key in ("lsh_attn_chunk_length", "local_attn_chunk_length"):
        if hf.get(key, 64) is None:
            raise bad(key, "null chunk length (one chunk over the whole sequence) is not supported")
    lsh_chunk = int(hf.get("lsh_attn_chunk_length", 64))
    max_len = int(hf.get("max_position_embeddings", 4096))
    buckets = hf.get("num_buckets")
    if buckets is None and "lsh" in layers:
        buckets = hf_auto_buckets(max_len, lsh_chunk)
    if isinstance(buckets, (list, tuple)):
        buckets = [int(b) for b in buckets]
        buckets = buckets[0] if len(buckets) == 1 else buckets

    cfg = ReformerConfig(
        vocab_size=int(hf.get("vocab_size", 320)),
        d_model=int(hf.get("hidden_size", 256)),
        n_heads=int(hf.get("num_attention_heads", 12)),
        d_head=int(hf.get("attention_head_size", 64)),
        d_ff=int(hf.get("feed_forward_size", 512)),
        n_layers=len(layers),
        attn_layers=layers,
        lsh_window="chunk",
        lsh_chunk_len=lsh_chunk,
        lsh_n_hashes=int(hf.get("num_hashes", 1)),
        lsh_n_buckets=buckets,
        lsh_chunks_before=int(hf.get("lsh_num_chunks_before", 1)),
        lsh_chunks_after=int(hf.get("lsh_num_chunks_after", 0)),
        local_chunk_len=int(hf.get("local_attn_chunk_length", 64)),
        local_chunks_before=int(hf.get("local_num_chunks_before", 1)),
        local_chunks_after=int(hf.get("local_num_chunks_after", 0)),
        causal=causal,
        reversible=True,
        dropout=float(hf.get("hidden_dropout_prob", 0.05)),
        attn_dropout=float(hf.get("lsh_attention_probs_dropout_prob", 0.0)),
        local_attn_dropout=float(hf.get("local_attention_probs_dropout_prob", 0.05)),
        max_seq_len=max_len,
        axial_pos_shape=[int(n) for n in hf.get("axial_pos_shape", [64, 64])],
        axial_pos_dims=[int(d) for d in hf.get("axial_pos_embds_dim", [64, 192])],
        axial_norm_std=float(hf.get("axial_norm_std", 1.0)),
        ff_chunk_size=int(hf.get("chunk_size_feed_forward") or 0),
        hash_seed=None if hf.get("hash_seed") is None else int(hf["hash_seed"]),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        activation=HF_ACTIVATIONS[act],
        init_std=float(hf.get("initializer_range", 0.02)),
        pad_token_id=None if hf.get("pad_token_id") is None else int(hf["pad_token_id"]),
    )
    if hf.get("chunk_size_lm_head"):
        cfg.loss_chunk_size = int(hf["chunk_size_lm_head"])
    try:
        return cfg.validate()
    except ConfigError as e:
        name = e.key.split(".", 1)[-1]
        raise bad(HF_FIELD_OF.get(name, name), e.reason) from None


def config_to_hf(cfg: ReformerConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of a model; ConfigError (naming our field) if HF cannot run it."""
    kinds = cfg.layer_kinds()
    if "full" in kinds:
        raise ConfigError("model.attn_layers", "HF's Reformer has no 'full' attention layers")
    if "lsh" in kinds and cfg.lsh_window != "chunk":
        raise ConfigError("model.lsh_window", f"is {cfg.lsh_window!r}, but HF's Reformer implements only the "
                                              "'chunk' window: the saved model would compute different outputs")
    factors = cfg.lsh_bucket_factors()
    return {
        "architectures": ["ReformerModelWithLMHead" if cfg.causal else "ReformerForMaskedLM"],
        "model_type": "reformer",
        "attention_head_size": cfg.d_head,
        "attn_layers": kinds,
        "axial_norm_std": cfg.resolved_axial_norm_std(),
        "axial_pos_embds": True,
        "axial_pos_embds_dim": cfg.resolved_axial_dims(),
        "axial_pos_shape": cfg.resolved_axial_shape(),
        "chunk_size_feed_forward": cfg.ff_chunk_size,
        "chunk_size_lm_head": 0,
        "eos_token_id": None,
        "feed_forward_size": cfg.d_ff,
        "hash_seed": cfg.hash_seed,
        "hidden_act": cfg.activation,
        "hidden_dropout_prob": cfg.dropout,
        "hidden_size": cfg.d_model,
        "initializer_range": cfg.init_std,
        "is_decoder": cfg.causal,
        "layer_norm_eps": cfg.layer_norm_eps,
        "local_attention_probs_dropout_prob": cfg.attn_dropout if cfg.local_attn_dropout is None
        else cfg.local_attn_dropout,
        "local_attn_chunk_length": cfg.local_chunk_len,
        "local_num_chunks_after": cfg.local_chunks_after,
        "local_num_chunks_before": cfg.local_chunks_before,
        "lsh_attention_probs_dropout_prob": cfg.attn_dropout,
        "lsh_attn_chunk_length": cfg.lsh_chunk_len,
        "lsh_num_chunks_after": cfg.lsh_chunks_after,
        "lsh_num_chunks_before": cfg.lsh_chunks_before,
        "max_position_embeddings": cfg.max_seq_len,
        "num_attention_heads": cfg.n_heads,
        "num_buckets": factors[0] if len(factors) == 1 else factors,
        "num_hashes": cfg.lsh_n_hashes,
        "num_hidden_layers": len(kinds),
        # HF fills its automatic padding with this id (the positions are masked, any id works)
        "pad_token_id": 0 if cfg.pad_token_id is None else cfg.pad_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": cfg.vocab_size,
    }


# ---------------------------------------------------------------------------------------- weights
# (our name fragment, HF name fragment), applied in order to every parameter name
_RENAMES = (
    ("layers.", "reformer.encoder.layers."),
    ("embeddings.", "reformer.embeddings."),
    ("final_norm.", "reformer.encoder.layer_norm."),
    ("lm_head.weight", "lm_head.decoder.weight"),
    (".attention.output.weight", ".attention.output.dense.weight"),
    (".feed_forward.dense.", ".feed_forward.dense.dense."),
    (".feed_forward.output.", ".feed_forward.output.dense."),
)


def hf_name(name: str) -> str:
    """The HF state-dict key of one of our parameter names."""
    for ours, theirs in _RENAMES:
        if ours.startswith(".") and ours in name:
            name = name.replace(ours, theirs)
        elif name.startswith(ours):
            name = theirs + name[len(ours):]
    return name


def _axial_hf_shape(cfg: ReformerConfig, axis: int) -> tuple[int, ...]:
    shape = [1] * len(cfg.resolved_axial_shape())
    shape[axis] = cfg.resolved_axial_shape()[axis]
    return (*shape, cfg.resolved_axial_dims()[axis])


def state_dict_to_hf(model: ReformerLM) -> dict[str, Tensor]:
    """Our parameters under HF names and shapes (fp32, contiguous, unshared: ready for safetensors)."""
    out = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32)
        if name.startswith("embeddings.position_embeddings.weights."):
            tensor = tensor.reshape(_axial_hf_shape(model.config, int(name.rsplit(".", 1)[1])))
        out[hf_name(name)] = tensor.contiguous().clone()
    return out


def state_dict_from_hf(model: ReformerLM, hf_state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """HF tensors renamed and reshaped to ``model``'s state dict; CheckpointError on any mismatch."""
    hf_state = dict(hf_state)
    # 4.x ties lm_head.decoder.bias to lm_head.bias: a file holds one or both (identical) copies
    if "lm_head.bias" not in hf_state and "lm_head.decoder.bias" in hf_state:
        hf_state["lm_head.bias"] = hf_state["lm_head.decoder.bias"]
    hf_state.pop("lm_head.decoder.bias", None)
    out, missing = {}, []
    for name, ours in model.state_dict().items():
        key = hf_name(name)
        if key not in hf_state:
            missing.append(key)
            continue
        tensor = hf_state.pop(key)
        if name.startswith("embeddings.position_embeddings.weights.") and tensor.numel() == ours.numel():
            tensor = tensor.reshape(ours.shape)
        if tensor.shape != ours.shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(tensor.shape)}, the config implies "
                                  f"{tuple(ours.shape)}")
        out[name] = tensor.to(ours.dtype)
    if missing or hf_state:
        raise CheckpointError(f"{source}: weights do not match config.json (missing {missing[:5]}, "
                              f"unexpected {sorted(hf_state)[:5]})")
    return out

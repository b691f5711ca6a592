"""The four models compared by ``bench_train_step.py``, built at the same size.

Each builder takes the sequence length and returns ``step(ids) -> loss`` with ``loss`` a scalar that the
harness back-propagates. Shared size (the benchmark config): byte vocabulary 256, 6 layers,
d_model 256, 4 heads x 64, d_ff 1024, LSH chunk/bucket 64, 2 hashes, all-LSH, causal, reversible,
axial positions (L/64, 64), dropout 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB, LAYERS, D_MODEL, HEADS, D_HEAD, D_FF, CHUNK, HASHES = 256, 6, 256, 4, 64, 1024, 64, 2

Step = Callable[[Tensor], Tensor]


def next_tokens(ids: Tensor) -> Tensor:
    """Targets of next-token prediction over all L positions (the last one ignored)."""
    return F.pad(ids[:, 1:], (0, 1), value=-100)


def lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), next_tokens(ids).flatten(), ignore_index=-100)


def build_ours(length: int) -> tuple[nn.Module, Step]:
    from reformer_dist import ReformerConfig, ReformerLM

    config = ReformerConfig(
        vocab_size=VOCAB, d_model=D_MODEL, n_heads=HEADS, d_head=D_HEAD, d_ff=D_FF, n_layers=LAYERS,
        attn_layers=["lsh"], lsh_window="bucket", lsh_chunk_len=CHUNK, lsh_n_hashes=HASHES, causal=True,
        reversible=True, dropout=0.0, attn_dropout=0.0, max_seq_len=length,
        axial_pos_shape=[max(1, length // 64), 64], axial_pos_dims=[D_MODEL // 2, D_MODEL // 2],
        ff_chunk_size=min(length, 1024), loss_chunk_size=min(length, 1024),
    )
    model = ReformerLM(config).train()
    return model, lambda ids: model.loss(ids, next_tokens(ids))


def build_hf(length: int) -> tuple[nn.Module, Step]:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, num_attention_heads=HEADS, attention_head_size=D_HEAD,
        feed_forward_size=D_FF, attn_layers=["lsh"] * LAYERS, lsh_attn_chunk_length=CHUNK, num_hashes=HASHES,
        num_buckets=None, lsh_num_chunks_before=1, lsh_num_chunks_after=0, is_decoder=True,
        axial_pos_shape=(length // 64, 64), axial_pos_embds_dim=(D_MODEL // 2, D_MODEL // 2),
        max_position_embeddings=length, hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0, hidden_act="relu", pad_token_id=0, eos_token_id=1,
    )
    model = ReformerModelWithLMHead(config).train()
    return model, lambda ids: model(ids, labels=ids).loss  # HF shifts the labels itself


def build_lucidrains(length: int) -> tuple[nn.Module, Step]:
    from reformer_pytorch import ReformerLM

    model = ReformerLM(
        num_tokens=VOCAB, dim=D_MODEL, depth=LAYERS, max_seq_len=length, heads=HEADS, dim_head=D_HEAD,
        bucket_size=CHUNK, n_hashes=HASHES, ff_mult=D_FF // D_MODEL, causal=True, axial_position_emb=True,
        axial_position_shape=(length // 64, 64), ff_chunks=max(1, length // 16384),
    ).train()

    return model, lambda ids: lm_loss(model(ids), ids)


class SdpaBlock(nn.Module):
    """Pre-LN transformer block (SDPA): x + attn(LN(x)), then x + FF(LN(x)); with ``window`` each query
    attends only its last ``window`` positions (a causal sliding window). Also bench_learning.py's."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, d_ff: int, dropout: float = 0.0,
                 window: int | None = None):
        super().__init__()
        self.n_heads, self.d_head, self.dropout, self.window = n_heads, d_head, dropout, window
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * n_heads * d_head, bias=False)
        self.out = nn.Linear(n_heads * d_head, d_model, bias=False)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))

    def _drop(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout else x

    def forward(self, x: Tensor) -> Tensor:
        b, length, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, length, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        if self.window is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # key j is visible from query i when 0 <= i - j < window
            lag = torch.arange(length)[:, None] - torch.arange(length)[None, :]
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=(lag >= 0) & (lag < self.window))
        x = x + self._drop(self.out(att.transpose(1, 2).reshape(b, length, -1)))  # (B, L, H*Dh) -> (B, L, D)
        return x + self._drop(self.ff(self.ln2(x)))


class SdpaLM(nn.Module):
    """A plain pre-LN causal transformer of the same size (learned positions)."""

    def __init__(self, length: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Parameter(torch.zeros(length, D_MODEL))
        self.blocks = nn.ModuleList([SdpaBlock(D_MODEL, HEADS, D_HEAD, D_FF) for _ in range(LAYERS)])
        self.ln = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.emb(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build_sdpa(length: int) -> tuple[nn.Module, Step]:
    model = SdpaLM(length).train()
    return model, lambda ids: lm_loss(model(ids), ids)


BUILDERS: dict[str, Callable[[int], tuple[nn.Module, Step]]] = {
    "ours": build_ours,
    "hf": build_hf,
    "lucidrains": build_lucidrains,
    "sdpa": build_sdpa,
}

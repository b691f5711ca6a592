"""The Reformer language model: embeddings -> reversible (attention, feed-forward) layers -> LM head.

Layout follows HF's ``ReformerModelWithLMHead`` so weights map 1:1:
``Y1 = X1 + Attn(LN(X2))``, ``Y2 = X2 + FF(LN(Y1))`` starting from ``X1 = X2 = embeddings``; the head
reads ``LayerNorm(cat[Y1, Y2])`` (width 2*d_model) through ``Linear(2*d_model, vocab)`` with bias.

Any length up to ``max_seq_len`` works: inputs are right-padded to ``config.pad_multiple()`` and the
padding is masked out (real-token outputs do not depend on how much padding follows, except with the
reference ``chunk`` LSH window, whose sorted-order chunks see padding move their boundaries, as in HF).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from reformer_dist.errors import ReformerDistError
from reformer_dist.model import generation, hf_interop, native
from reformer_dist.model.attention import AttentionBlock
from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.embeddings import Embeddings
from reformer_dist.model.reversible import residual_stack, reversible_stack
from reformer_dist.model.rng import GeneratorHolder, dropout

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


class FeedForwardBlock(GeneratorHolder):
    """G of the reversible pair: ``dropout(output(act(dropout(dense(LN(x))))))`` (HF/trax order: dropout
    before the activation), position-wise, optionally in chunks of ``ff_chunk_size`` positions."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.d_model, config.d_ff)
        self.output = nn.Linear(config.d_ff, config.d_model)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = config.dropout
        self.chunk_size = config.ff_chunk_size

    def _chunk(self, x: Tensor) -> Tensor:
        h = dropout(self.dense(self.layer_norm(x)), self.dropout, self.generator, self.training)
        out = dropout(self.output(self.act(h)), self.dropout, self.generator, self.training)
        return out.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        if self.chunk_size <= 0 or x.shape[1] <= self.chunk_size:
            return self._chunk(x)
        return torch.cat([self._chunk(part) for part in x.split(self.chunk_size, dim=1)], dim=1)


class ReformerLayer(nn.Module):
    """One reversible layer: ``attention`` (F) and ``feed_forward`` (G), each with its private generator."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.attention = AttentionBlock(config, kind)
        self.feed_forward = FeedForwardBlock(config)


class ReformerLM(nn.Module):
    """Causal (or bidirectional) Reformer language model. See the module docstring."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.config = config.validate()
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([ReformerLayer(config, kind) for kind in config.layer_kinds()])
        self.final_norm = nn.LayerNorm(2 * config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(2 * config.d_model, config.vocab_size)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=config.init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # GPT-2's scaled init: 2 * n_layers branch outputs add into the residual streams; starting them at
        # init_std / sqrt(2 * n_layers) keeps the streams near the embeddings' scale whatever the depth
        # (fresh models only: a checkpoint loads its own weights)
        for layer in self.layers:
            for branch_output in (layer.attention.output, layer.feed_forward.output):
                nn.init.normal_(branch_output.weight, std=config.init_std / math.sqrt(2 * config.n_layers))

    # ------------------------------------------------------------------ forward paths
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) int64 -> (B, L, 2*d_model) after the final LayerNorm; attention_mask (B, L), 1 = real."""
        batch, length = input_ids.shape
        if length > self.config.max_seq_len:
            raise ReformerDistError(f"sequence length {length} exceeds model.max_seq_len={self.config.max_seq_len}")
        padded = math.ceil(length / self.config.pad_multiple()) * self.config.pad_multiple()
        mask = None if attention_mask is None else attention_mask.bool()
        if padded != length:
            input_ids = F.pad(input_ids, (0, padded - length))
            real = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device) if mask is None else mask
            mask = F.pad(real, (0, padded - length), value=False)
        x = self.embeddings(input_ids)
        if self.config.reversible:
            y1, y2 = reversible_stack(x, x, self.layers, mask, self.config.ff_chunk_size)
        else:
            y1, y2 = residual_stack(x, x, self.layers, mask)
        return self.final_norm(torch.cat([y1[:, :length], y2[:, :length]], dim=-1))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, L, vocab_size). Builds all logits: for training use :meth:`loss`."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask))

    def loss(self, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of ``logits[:, t]`` against ``targets[:, t]`` (-100 = ignore).

        The head + cross-entropy run over ``loss_chunk_size`` positions at a time and each chunk is
        recomputed in the backward, so (B, L, vocab) logits never exist whole, not even for autograd.
        """
        hidden = self.hidden_states(input_ids, attention_mask)
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, t in zip(hidden.split(self.config.loss_chunk_size, dim=1),
                        targets.split(self.config.loss_chunk_size, dim=1)):
            if torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss_sum, h, t, use_reentrant=False, preserve_rng_state=False)
            else:
                total = total + self._chunk_loss_sum(h, t)
        return total / (targets != -100).sum().clamp(min=1)

    def _chunk_loss_sum(self, hidden: Tensor, targets: Tensor) -> Tensor:
        logits = self.lm_head(hidden).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")

    # ------------------------------------------------------------------ checkpoints and decoding
    # (implemented beside the model: hf_interop.py, native.py, generation.py)
    from_hf = staticmethod(hf_interop.from_hf)
    save_hf = hf_interop.save_hf
    from_native = staticmethod(native.from_native)
    save_native = native.save_native
    generate = generation.generate

    # ------------------------------------------------------------------ private randomness
    def _generators(self) -> dict[str, torch.Generator]:
        return {name: m.generator for name, m in self.named_modules() if isinstance(m, GeneratorHolder)}

    def rng_state(self) -> dict[str, Tensor]:
        """The state of every private generator (module name -> byte tensor), for an exact resume."""
        return {name: g.get_state() for name, g in self._generators().items()}

    def set_rng_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`rng_state` output; every generator must be present."""
        generators = self._generators()
        if set(state) != set(generators):
            missing, extra = sorted(set(generators) - set(state)), sorted(set(state) - set(generators))
            raise ReformerDistError(f"RNG state does not match the model (missing {missing}, unexpected {extra})")
        for name, g in generators.items():
            g.set_state(state[name].cpu())

    def reseed(self, seed: int) -> None:
        """Seed every private generator deterministically from ``seed`` (one derived seed per generator)."""
        master = torch.Generator().manual_seed(seed)
        for g in self._generators().values():
            g.manual_seed(int(torch.randint(0, 2**62, (), generator=master).item()))

"""The Reformer language model: embeddings -> reversible (attention, feed-forward) layers -> LM head.

Layout follows HF's ``ReformerModelWithLMHead`` so weights map 1:1:
``Y1 = X1 + Attn(LN(X2))``, ``Y2 = X2 + FF(LN(Y1))`` starting from ``X1 = X2 = embeddings``; the head
reads ``LayerNorm(cat[Y1, Y2])`` (width 2*d_model) through ``Linear(2*d_model, vocab)`` with bias.

Any length up to ``max_seq_len`` works: inputs are right-padded to ``config.pad_multiple()`` and the
padding is masked out (real-token outputs do not depend on how much padding follows, except with the
reference ``chunk`` LSH window, whose sorted-order chunks see padding move their boundaries, as in HF).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reformer_dist.errors import ReformerDistError
from reformer_dist.model.attention import AttentionBlock, LSHSelfAttention
from reformer_dist.model.config import ACTIVATIONS, ReformerConfig
from reformer_dist.model.embeddings import Embeddings
from reformer_dist.model.reversible import (
    TileHook,
    autocast_state,
    mark_tile,
    residual_stack,
    reversible_stack,
    tile_spans,
)
from reformer_dist.model.rng import GeneratorHolder, draw_seed, positional_dropout
from reformer_dist.model.sequence_parallel import SequenceShard

ROTATION_SEED = 0  # the default draw of inference rotations (see ReformerLM.draw_rotations)



class FeedForwardBlock(GeneratorHolder):
    """G of the reversible pair: ``dropout(output(act(dropout(dense(LN(x))))))`` (HF/trax order: dropout
    before the activation), position-wise, optionally in chunks of ``ff_chunk_size`` positions.

    One seed per call (both dropouts, streams 0 and 1), masks addressed by position: a chunk of a call
    (the reversible backward recomputes chunk by chunk) drops what the whole call drops there."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dense = nn.Linear(config.d_model, config.d_ff)
        self.output = nn.Linear(config.d_ff, config.d_model)
        name, kwargs = ACTIVATIONS[config.activation]
        self.act = functools.partial(getattr(F, name), **kwargs)
        self.dropout = config.dropout
        self.chunk_size = config.ff_chunk_size

    def _chunk(self, x: Tensor, seed: int | None, start: int) -> Tensor:
        h = self.dense(self.layer_norm(x))
        if seed is not None:
            h = positional_dropout(h, self.dropout, seed, start, stream=0)
        out = self.output(self.act(h))
        if seed is not None:
            out = positional_dropout(out, self.dropout, seed, start, stream=1)
        return out.to(x.dtype)

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        """(B, L, d_model) at positions [start, start + L) -> (B, L, d_model)."""
        seed = draw_seed(self.generator) if self.training and self.dropout > 0 else None
        if self.chunk_size <= 0 or x.shape[1] <= self.chunk_size:
            return self._chunk(x, seed, start)
        return torch.cat([self._chunk(x[:, s : s + self.chunk_size], seed, start + s)
                          for s in range(0, x.shape[1], self.chunk_size)], dim=1)


class ReformerLayer(nn.Module):
    """One reversible layer: ``attention`` (F) and ``feed_forward`` (G), each with its private generator."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.attention = AttentionBlock(config, kind)
        self.feed_forward = FeedForwardBlock(config)


class ChunkedLossSum(torch.autograd.Function):
    """``sum_chunks model._chunk_loss_sum(y1, y2, targets)`` over position chunks ``spans``, each chunk
    recomputed in the backward, which writes its stream gradients into one (B, L, d_model) tensor per stream:
    no chunk's activations outlive it, and no per-chunk gradient pieces wait to be joined (2 stream-sized
    tensors fewer at the head's peak than autograd's split + checkpoint). The chunks' nested backwards
    accumulate into the head's parameters; the model's tile hook hears which one is the last."""

    @staticmethod
    def forward(ctx, y1: Tensor, y2: Tensor, targets: Tensor, spans: list[tuple[int, int]],
                model: ReformerLM) -> Tensor:
        with torch.no_grad():
            total = sum(model._chunk_loss_sum(y1[:, s:e], y2[:, s:e], targets[:, s:e]) for s, e in spans)
        ctx.autocast = autocast_state(y1.device.type)
        ctx.save_for_backward(y1, y2, targets)
        ctx.spans, ctx.model = spans, model
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        y1, y2, targets = ctx.saved_tensors
        model, end = ctx.model, y1.shape[1]
        grad_y1, grad_y2 = torch.empty_like(y1), torch.empty_like(y2)
        for s, e in ctx.spans:
            a, b = y1[:, s:e].detach().requires_grad_(), y2[:, s:e].detach().requires_grad_()
            mark_tile(model.tile_hook, [model.final_norm, model.lm_head], last=e == end)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                chunk = model._chunk_loss_sum(a, b, targets[:, s:e])
            torch.autograd.backward(chunk, grad)
            grad_y1[:, s:e], grad_y2[:, s:e] = a.grad, b.grad
        return grad_y1, grad_y2, None, None, None


class ReformerLM(nn.Module):
    """Causal (or bidirectional) Reformer language model. See the module docstring."""

    sequence_shard: SequenceShard | None = None
    """Set by :meth:`shard_sequence`: this process holds one shard of each sequence."""
    tile_hook: TileHook | None = None
    """Set by :meth:`set_tile_hook`: told before each tile of a reversible layer's backward."""

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

    # ------------------------------------------------------------------ sequence parallelism
    def shard_sequence(self, shard: SequenceShard | None) -> None:
        """From now on every input holds one shard of each sequence (``sequence_parallel.py``): the forward
        paths run on this rank's positions and exchange heads around attention through ``shard``; the loss
        is the whole sequence's. None returns to whole sequences."""
        if shard is not None and self.config.n_heads % shard.size:
            raise ReformerDistError(f"model.n_heads={self.config.n_heads} is not divisible by the "
                                    f"{shard.size} ranks that share a sequence")
        self.sequence_shard = shard

    def set_tile_hook(self, hook: TileHook | None) -> None:
        """The reversible backward runs each layer in tiles (feed-forward chunks, attention head groups) whose
        nested backwards accumulate into the same parameters; ``hook(parameters, last)`` is called before
        each tile (``reversible.py``), e.g. to hold back a reduction that would fire on every accumulation."""
        self.tile_hook = hook

    # ------------------------------------------------------------------ forward paths
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, L) int64 -> (B, L, 2*d_model) after the final LayerNorm; attention_mask (B, L), 1 = real.
        Under :meth:`shard_sequence`, L is this rank's shard (the whole sequence is P times longer)."""
        return self.final_norm(torch.cat(self.streams(input_ids, attention_mask), dim=-1))

    def streams(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The two residual streams after the last layer, (B, L, d_model) each: the final LayerNorm reads
        their concatenation (``hidden_states``). Arguments as there."""
        batch, length = input_ids.shape
        shard = self.sequence_shard
        total = length if shard is None else length * shard.size
        if total > self.config.max_seq_len:
            raise ReformerDistError(f"sequence length {total} exceeds model.max_seq_len={self.config.max_seq_len}")
        multiple = self.config.pad_multiple()
        padded = math.ceil(length / multiple) * multiple
        mask = None if attention_mask is None else attention_mask.bool()
        if shard is not None:
            # padding would have to go at the end of the last shard only: sharded sequences come unpadded
            if total % multiple:
                raise ReformerDistError(f"a sequence-parallel sequence of {total} positions is not a multiple of "
                                        f"the chunk length {multiple}")
            padded = length
            mask = None if mask is None else shard.gather(mask)
        elif padded != length:
            input_ids = F.pad(input_ids, (0, padded - length))
            real = torch.ones(batch, length, dtype=torch.bool, device=input_ids.device) if mask is None else mask
            mask = F.pad(real, (0, padded - length), value=False)
        x = self.embeddings(input_ids, 0 if shard is None else shard.start(length))
        if self.config.reversible:
            y1, y2 = reversible_stack(x, x, self.layers, mask, self.config.ff_chunk_size, shard, self.tile_hook)
        else:
            y1, y2 = residual_stack(x, x, self.layers, mask, shard)
        return y1[:, :length], y2[:, :length]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, L, vocab_size). Builds all logits: for training use :meth:`loss`."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask))

    def loss(self, input_ids: Tensor, targets: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of ``logits[:, t]`` against ``targets[:, t]`` (-100 = ignore).

        The final LayerNorm + head + cross-entropy run over ``loss_chunk_size`` positions at a time and each
        chunk is recomputed in the backward (``ChunkedLossSum``), so neither the (B, L, 2*d_model) normalised
        streams nor the (B, L, vocab) logits ever exist whole, not even for autograd.
        Under :meth:`shard_sequence` the value is the whole sequence's mean (each shard's sum, summed over
        the shards, over the global count of targets); the gradient flows through this shard's positions.
        """
        y1, y2 = self.streams(input_ids, attention_mask)
        total = ChunkedLossSum.apply(y1, y2, targets, tile_spans(y1.shape[1], self.config.loss_chunk_size), self)
        count = (targets != -100).sum()
        if self.sequence_shard is not None:
            total, count = self.sequence_shard.sum(total), self.sequence_shard.sum(count)
        return total / count.clamp(min=1)

    def _chunk_loss_sum(self, y1: Tensor, y2: Tensor, targets: Tensor) -> Tensor:
        logits = self.lm_head(self.final_norm(torch.cat([y1, y2], dim=-1))).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")

    # ------------------------------------------------------------------ deployment: one draw of rotations
    def draw_rotations(self, seed: int = ROTATION_SEED) -> list[Tensor | None]:
        """Each layer's LSH rotations for inference (None for other layers): the frozen ones when the model
        has them (``seed`` is then ignored), else one fixed draw: layer i uses ``hash_seed``'s when the
        config sets one, else a generator seeded ``seed + i``. Cached decoding, export and every serving
        backend take their rotations from here, so a prompt hashes (and decodes) alike everywhere."""
        lsh = [layer.attention.self_attention for layer in self.layers]
        if any(isinstance(sa, LSHSelfAttention) and sa.frozen_rotations is not None for sa in lsh):
            return [sa.frozen_rotations if isinstance(sa, LSHSelfAttention) else None for sa in lsh]
        device = self.lm_head.weight.device
        return [sa.rotations(torch.Generator().manual_seed(seed + i), device) if isinstance(sa, LSHSelfAttention)
                else None for i, sa in enumerate(lsh)]

    def freeze_rotations(self, seed: int = ROTATION_SEED) -> ReformerLM:
        """Record a fresh ``draw_rotations(seed)`` in the LSH layers (fp32, untouched by dtype casts):
        until :meth:`unfreeze_rotations`, every forward hashes with them and draws no dropout seed while
        dropout is off, which is what an exported graph holds as constants (unfrozen, a model without
        ``hash_seed`` draws fresh rotations per forward, as in training). Returns the model."""
        self.unfreeze_rotations()
        for layer, rotations in zip(self.layers, self.draw_rotations(seed)):
            if rotations is not None:
                layer.attention.self_attention.frozen_rotations = rotations.float()
        return self

    def unfreeze_rotations(self) -> ReformerLM:
        """Back to per-forward rotations (training)."""
        for layer in self.layers:
            if isinstance(layer.attention.self_attention, LSHSelfAttention):
                layer.attention.self_attention.frozen_rotations = None
        return self

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

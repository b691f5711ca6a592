"""Token embeddings plus axial positional embeddings (HF Reformer layout, any length up to the table)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reformer_dist.model.config import ReformerConfig
from reformer_dist.model.rng import GeneratorHolder, dropout


class AxialPositionalEmbedding(nn.Module):
    """Factorised position table: position j uses ``weights[i][(j // prod(shape[i+1:])) % shape[i]]`` for
    each axis i, concatenated along features (row-major, like HF's code). ``weights[i]`` is
    (shape[i], dims[i]); HF stores the same numbers as (1, .., shape[i], .., 1, dims[i]).
    """

    def __init__(self, shape: list[int], dims: list[int], std: float):
        super().__init__()
        self.shape = list(shape)
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(n, d) * std) for n, d in zip(shape, dims)])

    def forward(self, length: int, device: torch.device, start: int = 0) -> Tensor:
        """(length, sum(dims)) for positions [start, start + length); positions past the table wrap (only
        padding ever gets there)."""
        pos = torch.arange(start, start + length, device=device) % math.prod(self.shape)
        parts, stride = [], math.prod(self.shape)
        for n, weight in zip(self.shape, self.weights):
            stride //= n
            parts.append(weight[(pos // stride) % n])
        return torch.cat(parts, dim=-1)


class Embeddings(GeneratorHolder):
    """``dropout(word_embeddings(ids)) + axial_positions`` as HF (positional dropout is not applied)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.dropout
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.word_embeddings.weight, std=config.init_std)
        self.position_embeddings = AxialPositionalEmbedding(config.resolved_axial_shape(), config.resolved_axial_dims(),
                                                            config.resolved_axial_norm_std())

    def forward(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """(B, L) int64 at positions [start, start + L) -> (B, L, d_model)."""
        x = dropout(self.word_embeddings(input_ids), self.dropout, self.generator, self.training, start)
        return x + self.position_embeddings(input_ids.shape[1], input_ids.device, start).to(x.dtype)

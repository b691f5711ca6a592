"""Choosing the next token: the one sampler of every decoding path (``generate``, ``serve``, any backend).

Logits arrive on the host as NumPy rows (V,) whatever computed them, so the sampler needs no torch and
picks the same token from the same logits on every backend. Per sequence, in this order:

1. ``logit_bias``        added to the logits of the named token ids (OpenAI: -100 bans, +100 forces);
2. penalties            OpenAI's ``logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty``,
                        ``c[j]`` = how often token j was generated so far in this sequence (not the prompt);
3. choice               greedy (temperature 0: the argmax, the lowest id on ties) or a draw from
                        ``softmax(logits / temperature)`` restricted to the ``top_k`` likeliest tokens and to
                        the smallest set of likeliest tokens whose probability reaches ``top_p``.

Draws come from a private ``numpy.random.Generator`` seeded by ``seed`` (fresh OS entropy when None), so a
seeded request gives the same text on every backend; the global RNGs are never touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from reformer_dist.errors import ConfigError

MAX_PENALTY = 2.0  # OpenAI's range for frequency_penalty / presence_penalty: [-2, 2]
MAX_LOGIT_BIAS = 100.0  # ... and for a logit_bias value: [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence asked for."""

    max_tokens: int
    """Tokens to generate at most."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k likeliest tokens (0 = all)."""
    top_p: float = 1.0
    """Sample among the smallest set of likeliest tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings (applied to the text)."""
    seed: int | None = None
    """Seed of this sequence's random stream (None = fresh entropy)."""
    logprobs: int | None = None
    """Also report the chosen token's log-probability and this many alternatives (None = no)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated before (OpenAI, in [-2, 2])."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit once it was generated at all (OpenAI, in [-2, 2])."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit before choosing (OpenAI, values in [-100, 100])."""

    def validate(self, vocab_size: int) -> SamplingParams:
        """Raise ConfigError naming the first field out of range; return self."""
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ConfigError("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError("top_k", f"must be >= 0 (0 = all tokens), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ConfigError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in self.logit_bias.items():
            if not 0 <= token < vocab_size:
                raise ConfigError("logit_bias", f"token id {token} is outside the vocabulary [0, {vocab_size})")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ConfigError("logit_bias", f"bias {bias} of token {token} must be in [-100, 100]")
        return self


class Sampler:
    """The token chooser of one sequence: its parameters, its random stream and its generated-token counts."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)
        self._penalised = params.frequency_penalty != 0 or params.presence_penalty != 0
        self.counts = np.zeros(vocab_size, dtype=np.int64) if self._penalised else None
        self.bias = None
        if params.logit_bias:
            self.bias = np.zeros(vocab_size, dtype=np.float64)
            for token, value in params.logit_bias.items():
                self.bias[token] = value

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits (V,) after logit_bias and the penalties (a float64 copy when anything applies)."""
        if self.bias is None and not self._penalised:
            return logits
        out = logits.astype(np.float64)
        if self.bias is not None:
            out += self.bias
        if self._penalised:
            p = self.params
            out -= self.counts * p.frequency_penalty + (self.counts > 0) * p.presence_penalty
        return out

    def choose(self, logits: np.ndarray) -> int:
        """The next token from the model's logits (V,); records it for the penalties."""
        token = choose_token(self.adjusted(logits), self.params, self.rng)
        if self.counts is not None:
            self.counts[token] += 1
        return token


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token id from ``logits`` (V,) under temperature / top-k / top-p (no bias, no penalties)."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logp = log_softmax(logits / params.temperature)
    order = np.argsort(-logp, kind="stable")  # most likely first; ties keep the lower id first
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(logp[order])
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (the likeliest token always stays)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep]
    cdf = np.cumsum(probs)
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(order[min(pick, len(order) - 1)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, computed in float64 so tiny probabilities keep their digits."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def top_logprobs(logp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, log p) pairs of one row of log-probabilities, most likely first."""
    if k <= 0:
        return []
    idx = np.argpartition(-logp, min(k, logp.shape[-1]) - 1)[:k]
    idx = idx[np.argsort(-logp[idx], kind="stable")]
    return [(int(i), float(logp[i])) for i in idx]

"""Choosing the next token from one row of logits, in NumPy.

The server samples on the host in NumPy rather than torch so that the ONNX Runtime and TensorRT serving
paths need no torch at all. Greedy decoding (temperature 0) is an argmax, exactly what the model's own
greedy generation picks; sampled text is reproducible for a given ``seed`` on this server (the random
stream is NumPy's, so it differs from ``reformer-dist generate --seed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence asked for (already validated against the server's limits)."""

    max_tokens: int
    """Tokens to generate at most."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Sample among the smallest set of most likely tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings."""
    seed: int | None = None
    """Seed of this sequence's random stream (None = fresh entropy)."""
    logprobs: int | None = None
    """Also report the chosen token's log-probability and this many alternatives (None = no)."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, computed in float64 so tiny probabilities keep their digits."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def choose_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token id from ``logits`` (V,) under temperature / top-k / top-p."""
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logp = log_softmax(logits / params.temperature)
    order = np.argsort(-logp, kind="stable")  # most likely first; ties keep the lower id first
    if params.top_k:
        order = order[: params.top_k]
    probs = np.exp(logp[order])
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:keep], probs[:keep]
    cdf = np.cumsum(probs)
    pick = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(order[min(pick, len(order) - 1)])


def top_logprobs(logp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token id, log p) pairs of one row of log-probabilities, most likely first."""
    if k <= 0:
        return []
    idx = np.argpartition(-logp, min(k, logp.shape[-1]) - 1)[:k]
    idx = idx[np.argsort(-logp[idx], kind="stable")]
    return [(int(i), float(logp[i])) for i in idx]

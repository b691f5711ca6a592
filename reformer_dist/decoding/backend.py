"""The backend protocol of the decoding runtime: what PyTorch, ONNX Runtime and TensorRT each implement.

A backend computes logits; it never chooses tokens (that is the sampler's work) and never decides who is
in the batch (the batcher's). Its decoding state is a batch of rows, each a sequence at its own position:

    state, logits = backend.prefill(prompts)      # run prompts (a list of token lists): a state of len(prompts)
                                                  # rows and each row's next-token logits (B, V) float32
    logits = backend.decode(state, tokens)        # append one token (B,) int64 per row; the next logits (B, V)
    state = backend.merge(state, other)           # rows of ``other`` appended after those of ``state``
    state = backend.release(state, keep)          # only the rows at indices ``keep`` remain (None: no rows)
    scores = backend.score(sequences, top)        # full-sequence log p(token_t | tokens_<t) (+ the top
                                                  # alternatives), for /v1/score and echoed prompts

``decode`` updates the state it is given (in place, or by rebinding its buffers), so callers hold one
state object per batch. Rows never see each other: a row's logits are the same whichever rows share its
batch (up to the float rounding of a batched matrix product).

:class:`RecomputingBackend` implements the protocol for any model given only the full-sequence logits of
a right-padded batch, by recomputing each row's whole sequence every step (quadratic in the length): the
fallback for graphs exported without their cached-generation companions, and for tests.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reformer_dist.decoding.sampler import log_softmax, top_logprobs

State = Any  # each backend's own batch state


@dataclass
class TokenScores:
    """How likely each token of a sequence of n tokens was given the ones before it."""

    logprobs: np.ndarray
    """(n-1,) float64: log p(token_t | tokens_<t) for t = 1..n-1."""
    top: list[list[tuple[int, float]]]
    """Per scored position, the likeliest (token id, log p) pairs, most likely first (empty lists if not asked)."""


class DecodingBackend(ABC):
    name: str
    """'torch', 'onnxruntime', 'tensorrt' (or a test's)."""
    max_seq_len: int
    """Longest sequence (prompt + generated) the model accepts."""
    vocab_size: int
    max_batch_size: int | None = None
    """Largest batch the backend accepts (a TensorRT profile's maximum); None = any."""
    cached: bool = True
    """False for a backend that recomputes every sequence per token (said in a warning at start-up)."""

    @abstractmethod
    def prefill(self, prompts: list[list[int]]) -> tuple[State, np.ndarray]:
        """Run the prompts; return their state and next-token logits (B, V) float32."""

    @abstractmethod
    def decode(self, state: State, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens`` (B,) int64, one per row of ``state``; return the next logits (B, V) float32."""

    @abstractmethod
    def merge(self, state: State, other: State) -> State:
        """One state with the rows of ``state`` followed by those of ``other``."""

    @abstractmethod
    def release(self, state: State, keep: Sequence[int]) -> State | None:
        """The state with only the rows ``keep`` (in that order); None when ``keep`` is empty."""

    @abstractmethod
    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) float32 of a right-padded batch ``input_ids`` (B, T) int64 whose row b holds
        ``lengths[b]`` real tokens; positions at or after a row's length are padding (ignored)."""

    # ------------------------------------------------------------------ shared on top of forward
    pad_token_id: int = 0
    """Id written into the padding of a right-padded batch (masked, so its value does not matter)."""
    length_multiple: int = 1
    """Padded batch lengths are rounded up to a multiple of this (graphs exported for chunked lengths)."""

    def pack(self, sequences: Sequence[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad token lists into (B, T) int64 plus their lengths (B,)."""
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        t = int(lengths.max())
        t = min(self.max_seq_len, math.ceil(t / self.length_multiple) * self.length_multiple)
        ids = np.full((len(sequences), t), self.pad_token_id, dtype=np.int64)
        for row, seq in zip(ids, sequences):
            row[: len(seq)] = seq
        return ids, lengths

    def last_logits(self, sequences: Sequence[list[int]]) -> np.ndarray:
        """Next-token logits (B, V) of each whole sequence, recomputed from its first token."""
        ids, lengths = self.pack(sequences)
        return self.forward(ids, lengths)[np.arange(len(sequences)), lengths - 1]

    def score(self, sequences: Sequence[list[int]], top: int = 0) -> list[TokenScores]:
        """For each sequence, its tokens' log-probabilities and the ``top`` likeliest alternatives."""
        ids, lengths = self.pack(sequences)
        logp = log_softmax(self.forward(ids, lengths))  # (B, T, V)
        return [TokenScores(logp[b, np.arange(n - 1), ids[b, 1:n]], [top_logprobs(logp[b, t], top) for t in range(n - 1)])
                for b, n in enumerate(lengths)]


class RecomputingBackend(DecodingBackend):
    """The protocol on top of :meth:`forward` alone: the state is the rows' token lists, and every step
    recomputes each whole sequence. Correct for any model; its cost per token grows with the length."""

    cached = False

    def prefill(self, prompts: list[list[int]]) -> tuple[list[list[int]], np.ndarray]:
        rows = [list(p) for p in prompts]
        return rows, self.last_logits(rows)

    def decode(self, state: list[list[int]], tokens: np.ndarray) -> np.ndarray:
        for row, token in zip(state, tokens.tolist()):
            row.append(int(token))
        return self.last_logits(state)

    def merge(self, state: list[list[int]], other: list[list[int]]) -> list[list[int]]:
        return state + other

    def release(self, state: list[list[int]], keep: Sequence[int]) -> list[list[int]] | None:
        return [state[i] for i in keep] or None

"""Continuous batching: sequences join the decode batch and leave it between any two steps.

    batcher = ContinuousBatcher(backend)
    logits = batcher.join(["a", "b"], [prompt_a, prompt_b])   # prefilled, merged into the batch: (2, V)
    logits = batcher.decode({"a": 17, "b": 4})                # one step for every member: (2, V)
    batcher.leave(["a"])                                      # its rows are dropped; "b" carries on

Joining prefills the newcomers only (the running rows are not recomputed) and appends their rows to the
batch state; leaving drops rows without touching the others. One decode step serves every member at
once, each at its own position. :func:`generate_stream` drives a batcher and the sampler for a fixed set
of prompts: what ``reformer-dist generate`` and :func:`reformer_dist.decoding.generate` run, and the same
code path as the server's engine, so both give the same tokens.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import replace

import numpy as np

from reformer_dist.decoding.backend import DecodingBackend, State
from reformer_dist.decoding.sampler import Sampler, SamplingParams
from reformer_dist.errors import ConfigError


class ContinuousBatcher:
    """The decode batch of one backend (see module doc); ``members`` lists the sequence ids by row."""

    def __init__(self, backend: DecodingBackend):
        self.backend = backend
        self.members: list[Hashable] = []
        self.state: State | None = None

    def __len__(self) -> int:
        return len(self.members)

    def join(self, ids: list[Hashable], prompts: list[list[int]]) -> np.ndarray:
        """Prefill ``prompts`` and add them to the batch as ``ids``; their next-token logits (N, V)."""
        state, logits = self.backend.prefill(prompts)
        self.state = state if self.state is None else self.backend.merge(self.state, state)
        self.members.extend(ids)
        return logits

    def decode(self, tokens: Mapping[Hashable, int]) -> np.ndarray:
        """Append one token to every member (``tokens[id]``); the next logits (B, V) in ``members`` order."""
        column = np.array([tokens[m] for m in self.members], dtype=np.int64)
        return self.backend.decode(self.state, column)

    def leave(self, ids: Iterable[Hashable]) -> None:
        """Drop these members' rows (ids not in the batch are ignored)."""
        gone = set(ids)
        keep = [i for i, m in enumerate(self.members) if m not in gone]
        if len(keep) == len(self.members):
            return
        self.state = self.backend.release(self.state, keep) if keep else None
        self.members = [self.members[i] for i in keep]

    def clear(self) -> None:
        """Forget every member (after a failed step)."""
        self.members, self.state = [], None


def check_request(backend: DecodingBackend, prompts: list[list[int]], params: SamplingParams,
                  limit_name: str = "max_seq_len") -> None:
    """The checks every front end shares: prompts non-empty and in the vocabulary, sampling settings,
    prompt + new tokens within the backend's ``max_seq_len`` (named ``limit_name`` in the error)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("prompt", "need at least one prompt, each of at least one token")
    if max(max(p) for p in prompts) >= backend.vocab_size or min(min(p) for p in prompts) < 0:
        raise ConfigError("prompt", f"token ids must be in [0, {backend.vocab_size})")
    params.validate(backend.vocab_size)
    longest = max(len(p) for p in prompts)
    if longest + params.max_tokens > backend.max_seq_len:
        raise ConfigError("max_new_tokens", f"prompt ({longest}) + max_new_tokens ({params.max_tokens}) "
                                            f"exceeds {limit_name}={backend.max_seq_len}")


def generate_stream(backend: DecodingBackend, prompts: list[list[int]], params: SamplingParams,
                    eos_token_id: int | None = None) -> Iterator[np.ndarray]:
    """Yield the next token of every prompt (B,) int64 per step; a row that produced ``eos_token_id``
    keeps yielding it (and leaves the batch). Stops after ``params.max_tokens`` steps or once every row
    has finished. With ``params.seed`` set, row i samples from a stream seeded ``seed + i``."""
    check_request(backend, prompts, params)
    samplers = [Sampler(params if params.seed is None else replace(params, seed=params.seed + i),
                        backend.vocab_size) for i in range(len(prompts))]
    batcher = ContinuousBatcher(backend)
    logits = batcher.join(list(range(len(prompts))), prompts)
    tokens = np.zeros(len(prompts), dtype=np.int64)
    done = np.zeros(len(prompts), dtype=bool)
    for step in range(params.max_tokens):
        for row, member in zip(logits, batcher.members):
            tokens[member] = samplers[member].choose(row)
        if eos_token_id is not None:
            tokens[done] = eos_token_id
            finished = [m for m in batcher.members if tokens[m] == eos_token_id]
            done[finished] = True
            batcher.leave(finished)
        yield tokens.copy()
        if step + 1 == params.max_tokens or not batcher.members:
            return
        logits = batcher.decode({m: int(tokens[m]) for m in batcher.members})


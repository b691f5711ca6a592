"""The ``serve:`` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind; loopback unless told otherwise."""
    port: int = 8000
    """TCP port."""
    max_batch_size: int = 8
    """Sequences decoded together."""
    max_tokens_cap: int = 512
    """Upper bound on a request's max_tokens."""
    max_concurrency: int = 64
    """Requests admitted at once (queued + running); more get HTTP 429."""
    max_body_bytes: int = 1_000_000
    """Largest accepted request body."""

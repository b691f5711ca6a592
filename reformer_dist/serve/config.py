"""The ``serve:`` section of a run config (also the defaults of ``reformer-dist serve``'s flags)."""

from __future__ import annotations

from dataclasses import dataclass

from reformer_dist.errors import ConfigError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind; loopback unless told otherwise (0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """TCP port (0 picks a free one; the chosen port is printed at start)."""
    max_batch_size: int = 8
    """Sequences decoded together in one step; new sequences join as others finish."""
    max_tokens_cap: int = 512
    """Upper bound on a request's max_tokens (larger values are rejected with HTTP 400)."""
    max_concurrency: int = 64
    """Sequences admitted at once (queued + decoding); a request that would exceed it gets HTTP 429."""
    max_body_bytes: int = 1_000_000
    """Largest accepted request body; enforced while the body is read, before it is parsed (HTTP 413)."""
    batch_window_ms: float = 5.0
    """How long an idle server waits after the first request for more to batch with it."""
    request_timeout_s: float = 120.0
    """A sequence not finished this long after it was admitted is stopped (HTTP 504, or an error event)."""
    drain_timeout_s: float = 60.0
    """On SIGTERM, in-flight requests get this long to finish before the server exits anyway."""
    chat_template: str | None = None
    """A Jinja2 chat template file (Hugging Face convention) enabling /v1/chat/completions; without one
    the endpoint answers 400 (a base language model continues text, it does not chat)."""

    def validate(self, prefix: str = "serve") -> ServeConfig:
        """Check every field; raise ConfigError naming the first bad one. Returns self."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"{prefix}.port", f"must be in [0, 65535], got {self.port}")
        for name in ("max_batch_size", "max_tokens_cap", "max_concurrency", "max_body_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("batch_window_ms", "request_timeout_s", "drain_timeout_s"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.request_timeout_s == 0:
            raise ConfigError(f"{prefix}.request_timeout_s", "must be > 0")
        return self

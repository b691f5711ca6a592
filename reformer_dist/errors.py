"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, a malformed request) raises a subclass of
:class:`ReformerDistError`. The CLI prints its message and exits with status 2 instead of a traceback;
library callers can catch it. Programming errors stay ordinary exceptions.
"""


class ReformerDistError(Exception):
    """Base class of errors caused by user input; the message says what is wrong and where."""


class ConfigError(ReformerDistError):
    """An invalid configuration: the message starts with the offending key (e.g. ``train.seq_len``)."""

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class DataError(ReformerDistError):
    """Missing, empty, corrupted or inconsistent data (names the file or directory)."""


class CheckpointError(ReformerDistError):
    """A checkpoint that is missing, incomplete or does not match the model (names the path)."""


def describe(e: BaseException, limit: int = 300) -> str:
    """A library's exception as a short single line to quote in a user-facing message: its type and the
    first line of its text (library messages run to pages: tracebacks of the C++ side, advice, URLs)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

"""Incremental detokenization with stop strings.

Tokens arrive one at a time, but text cannot be released one token at a time:
- a byte-level token may be half of a multi-byte UTF-8 character (it decodes to U+FFFD until the rest
  arrives), so a trailing replacement character is held back until the sequence ends;
- the text generated so far may end with the beginning of a stop string, which must not reach the client
  if the stop string completes; that suffix is held back until it either completes or diverges.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextStream:
    """Turns generated token ids into releasable text deltas, stopping at the first stop string."""

    def __init__(self, tokenizer: Detokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # the full text so far (truncated before the stop string once one matched)
        self.released = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can now be released (maybe ''). Sets ``stopped``."""
        self.ids.append(token_id)
        # Decode everything each time: a token's text can depend on its neighbours (subword merges,
        # multi-byte characters), so decoding token by token would not add up to the right text.
        self.text = self.tokenizer.decode(self.ids)
        cut = self._first_stop()
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(len(self.text))
        end = len(self.text)
        while end > self.released and self.text[end - 1] == REPLACEMENT and len(self.text) - end < 3:
            end -= 1
        end -= self._partial_stop_len(end)
        return self._release(end)

    def finish(self) -> str:
        """The sequence ended: release everything still held back."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self.released:
            return ""
        delta = self.text[self.released:end]
        self.released = end
        return delta

    def _first_stop(self) -> int | None:
        """Where the earliest stop string starts; released text is final, so only a match that reaches
        past the released point counts (one may straddle it: search from a stop's length before)."""
        start = max(0, self.released - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return max(min(hits), self.released) if hits else None

    def _partial_stop_len(self, end: int) -> int:
        """Length of the longest suffix of text[:end] that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.released), best, -1):
                if s.startswith(self.text[end - k:end]):
                    best = k
                    break
        return best

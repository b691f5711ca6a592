"""Stop requests: a preemption signal or a spent wall-time budget ends the run cleanly.

SIGTERM (what schedulers and ``kill`` send first) and SIGUSR1 (what ``sbatch --signal=USR1@120`` sends
ahead of the time limit) only set a flag; the training loop looks at it at the next step boundary, all
ranks agree through the per-step all-reduce (a signal may reach one rank only, or at different times),
and the run checkpoints and exits 0. The time budget (``train.time_limit_minutes``) works the same way.
"""

from __future__ import annotations

import signal
import time
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Watches for stop signals and the time budget; must be created on the main thread."""

    def __init__(self, time_limit_minutes: float | None):
        self.deadline = None if time_limit_minutes is None else time.monotonic() + 60.0 * time_limit_minutes
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def signalled(self) -> bool:
        return self.signal_name is not None

    @property
    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def restore(self) -> None:
        """Put the previous handlers back (a second signal during shutdown then acts as usual)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""Rendezvous ports of the launches this test session starts, and the DeepSpeed shared-memory segments that
carry them in their names (``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``): how the tests tell
their own segments from those of other jobs on the machine."""

from __future__ import annotations

import socket
from collections.abc import Iterable

USED: set[int] = set()


def free_port() -> int:
    """A free loopback port for a launch's rendezvous, remembered for the end-of-session check."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    USED.add(port)
    return port


def segments_of(ports: Iterable[int]) -> list[str]:
    """Names of the DeepSpeed segments in /dev/shm that belong to launches on ``ports``."""
    from reformer_dist.train.shm_comm import SEGMENT_PREFIX, SHM_DIR, parse_segment

    ports = set(ports)
    return sorted(p.name for p in SHM_DIR.glob(SEGMENT_PREFIX + "*")
                  if (s := parse_segment(p)) is not None and s.port in ports)

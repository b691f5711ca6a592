"""Housekeeping for DeepSpeed's CPU communication op (``deepspeed_shm_comm``): its JIT build lock and the
shared-memory segments it leaves in /dev/shm.

On CPU, creating DeepSpeed's torch backend JIT-builds the op with torch's ``cpp_extension`` (cached in
``~/.cache/torch_extensions/<py>_cpu/deepspeed_shm_comm``, or under ``TORCH_EXTENSIONS_DIR``), and, when every
rank is on one machine (the launcher's LOCAL_SIZE equals the world size), each rank then creates a 66 MiB
POSIX shared-memory segment ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` and maps
every peer's. DeepSpeed never unlinks them, so each 2-rank launch used to leave 132 MiB of RAM behind in
/dev/shm whatever way it ended. Three things here fix both problems:

* before the process group: a build ``lock`` that no process holds open is stale (torch's ``FileBaton`` keeps
  the lock's descriptor open for the whole build, and a killed builder's descriptors close with it); torch
  would wait on it forever, silently. We fail with the file and the fix instead, and wait for a live
  builder at most ``BUILD_WAIT_S``.
* before the process group, on one rank per machine: segments whose owners are gone (a run killed while
  setting up, or runs of older versions) are removed, with one line saying so. A segment is left alone
  while any process has it open or mapped, while its job's rendezvous port still accepts connections, or
  in its first seconds (between ``shm_open`` and the descriptor showing in /proc).
* after the process group: once every rank has mapped every peer's segment (a barrier), each rank unlinks
  its segment's *name*. The mappings stay valid, so DeepSpeed's op works as before, and the kernel frees
  the memory when the last rank exits, however it exits: normally, on a stop signal, on an error, or by
  ``kill -9``. Nothing is left in /dev/shm after the setup.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from reformer_dist.errors import ReformerDistError

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "deepspeed_allreduce_buffer_"  # SHM_BUFFER_NAME in DeepSpeed's csrc/cpu/comm/shm.cpp
FRESH_S = 5.0
"""A segment or lock younger than this is never judged ownerless: its creator may not show in /proc yet."""
BUILD_WAIT_S = 600.0
"""How long a launch waits for another process's JIT build of the op (about a minute on 2 cores)."""


@dataclass(frozen=True)
class Segment:
    """One DeepSpeed shared-memory segment, named ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``."""

    path: Path
    uid: int
    addr: str
    port: int
    rank: int


def segment_name(uid: int, addr: str, port: int | str, rank: int) -> str:
    return f"{SEGMENT_PREFIX}{uid}_{addr}_{port}_{rank}"


def parse_segment(path: Path) -> Segment | None:
    """The coordinates in a segment's name; None for any other file (the address may contain ``_``)."""
    if not path.name.startswith(SEGMENT_PREFIX):
        return None
    uid, *addr, port, rank = path.name[len(SEGMENT_PREFIX):].split("_")
    if not addr or not (uid.isdigit() and port.isdigit() and rank.isdigit()):
        return None
    return Segment(path, int(uid), "_".join(addr), int(port), int(rank))


def holders(paths: Iterable[Path]) -> dict[str, list[int]]:
    """real path -> pids of the processes that have it open or mapped (Linux /proc). Processes this user
    cannot inspect (other users') are not counted: segments are private to their user (mode 0600), and the
    build cache lives in the user's home."""
    wanted = {os.path.realpath(p) for p in paths}
    found: dict[str, list[int]] = {}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        seen: set[str] = set()
        with contextlib.suppress(OSError):  # the process ended, or is not ours to inspect
            for fd in (pid_dir / "fd").iterdir():
                with contextlib.suppress(OSError):
                    seen.add(os.readlink(fd))
        with contextlib.suppress(OSError):
            for line in (pid_dir / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6:
                    seen.add(fields[5])
        for path in seen & wanted:
            found.setdefault(path, []).append(int(pid_dir.name))
    return found


def _port_accepts_connections(addr: str, port: int) -> bool:
    """Whether ``addr:port`` (the job's rendezvous store, which lives as long as its rank 0) still answers.
    Only tried for IP literals and localhost, so no name lookup can stall a launch."""
    if addr != "localhost":
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            return False
    try:
        with socket.create_connection((addr, port), timeout=0.5):
            return True
    except ConnectionRefusedError:
        return False
    except OSError:  # unreachable or slow: cannot tell, so count the job as alive
        return True


def orphaned_segments(shm_dir: Path = SHM_DIR, min_age_s: float = FRESH_S) -> list[Segment]:
    """This user's DeepSpeed segments that no live job owns."""
    now, uid = time.time(), os.getuid()
    candidates = []
    for path in shm_dir.glob(SEGMENT_PREFIX + "*"):
        segment = parse_segment(path)
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            if segment is not None and st.st_uid == uid and now - st.st_mtime >= min_age_s:
                candidates.append(segment)
    if not candidates:
        return []
    held = holders(s.path for s in candidates)
    return [s for s in candidates
            if os.path.realpath(s.path) not in held and not _port_accepts_connections(s.addr, s.port)]


def remove_orphaned_segments(shm_dir: Path = SHM_DIR, min_age_s: float = FRESH_S) -> str | None:
    """Unlink the orphaned segments; returns the one line that says what was removed (None: nothing)."""
    removed, size = [], 0
    for segment in orphaned_segments(shm_dir, min_age_s):
        with contextlib.suppress(FileNotFoundError):  # another launch on this machine got there first
            nbytes = segment.path.stat().st_size
            segment.path.unlink()
            removed.append(segment.path.name)
            size += nbytes
    if not removed:
        return None
    names = ", ".join(sorted(removed)[:4]) + (f" and {len(removed) - 4} more" if len(removed) > 4 else "")
    return (f"removed {len(removed)} orphaned DeepSpeed shared-memory segment(s) of ended runs from {shm_dir} "
            f"({size / 2**20:.0f} MiB): {names}")


def release_segment_name(rank: int, shm_dir: Path = SHM_DIR) -> None:
    """Unlink this rank's segment name. Only once every peer has mapped it: the barrier follows
    DeepSpeed's setup, in which each rank maps every peer's segment (waiting for it to appear)."""
    dist.barrier()
    name = segment_name(os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    with contextlib.suppress(FileNotFoundError):  # no segment: ranks on several machines, or torchrun/srun
        (shm_dir / name).unlink()


# --------------------------------------------------------------------------------------------- build lock
def wait_for_build_lock(lock: Path, timeout_s: float = BUILD_WAIT_S, poll_s: float = 0.5) -> None:
    """Return once ``lock`` is gone; fail at once if no process holds it, or after ``timeout_s`` of waiting
    for the process that does."""
    start, announced = time.monotonic(), False
    while True:
        held = holders([lock]).get(os.path.realpath(lock), [])
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if not held and age >= FRESH_S:  # no builder (and not one that has only just created it)
            raise ReformerDistError(
                f"{lock} is left over from a JIT build of a DeepSpeed op that is no longer running (no process "
                f"holds it), and torch would wait on it forever: delete it (rm {lock}) and launch again")
        waited = time.monotonic() - start
        if waited >= timeout_s:
            pids = " ".join(map(str, held))
            raise ReformerDistError(
                f"{lock}: a JIT build of a DeepSpeed op (pid {pids}) has held this lock for over {timeout_s:.0f} "
                f"s; let it finish, or if it is stuck end it (kill {pids}), delete the lock (rm {lock}) and "
                f"launch again")
        if held and not announced:
            print(f"reformer-dist train: waiting for the JIT build of a DeepSpeed op (pid "
                     f"{' '.join(map(str, held))} holds {lock}), at most {timeout_s:.0f} s", flush=True)
            announced = True
        time.sleep(poll_s)


def shm_comm_build_lock() -> Path | None:
    """The lock torch's ``cpp_extension`` waits on when DeepSpeed JIT-loads its CPU comm op; None when this
    launch loads no such op (GPU accelerators, an op built at install time, an incompatible platform).
    The conditions are those of ``deepspeed.comm.torch.build_shm_op`` and ``OpBuilder.load``."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory  # the directory torch itself builds in

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False) \
            or installed_ops.get(builder.NAME, False):
        return None
    return Path(_get_build_directory(builder.NAME, verbose=False)) / "lock"


# --------------------------------------------------------------------------------------------- the hook
@contextlib.contextmanager
def housekeeping(rank: int, local_rank: int) -> Iterator[None]:
    """Wrap DeepSpeed's process-group setup: check the build lock and clear orphaned segments before it,
    release this rank's segment name after it (not after a failed setup: a peer may still look it up)."""
    lock = shm_comm_build_lock()
    if lock is None:  # no CPU comm op, so neither a build nor segments
        yield
        return
    wait_for_build_lock(lock)
    if local_rank == 0:
        report = remove_orphaned_segments()
        if report is not None:
            print(f"reformer-dist train: {report}", flush=True)
    yield
    release_segment_name(rank)

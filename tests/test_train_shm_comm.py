"""Housekeeping of DeepSpeed's CPU comm op (train/shm_comm.py): which /dev/shm segments count as orphaned, and
how a launch treats the op's JIT build lock. Other processes play the owners and builders; the segments
live in a temporary directory (the checks only look at paths, which /proc reports for any directory)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from launch_ports import free_port

from reformer_dist.errors import ReformerDistError
from reformer_dist.train.shm_comm import (
    FRESH_S,
    parse_segment,
    remove_orphaned_segments,
    segment_name,
    wait_for_build_lock,
)

UID = os.getuid()
OLD = time.time() - 3600  # an hour-old mtime: past the grace period for freshly created files


def make_segment(directory: Path, port: int, rank: int = 0, old: bool = True) -> Path:
    path = directory / segment_name(UID, "127.0.0.1", port, rank)
    path.write_bytes(b"\0" * 4096)
    if old:
        os.utime(path, (OLD, OLD))
    return path


class Holder:
    """Another process: runs ``code`` (which may use ``paths``), says "ready", runs ``then`` when told to."""

    def __init__(self, code: str, *paths: Path, then: str = "pass"):
        script = (f"import mmap, os, sys\npaths = {[str(p) for p in paths]!r}\n{code}\nprint('ready', flush=True)\n"
                  f"sys.stdin.readline()\n{then}\n")
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def go_on(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_segment_names_parse_back_including_addresses_with_underscores(tmp_path):
    for addr in ("127.0.0.1", "node_3", "fe80::1"):
        s = parse_segment(tmp_path / segment_name(1000, addr, 29500, 7))
        assert (s.uid, s.addr, s.port, s.rank) == (1000, addr, 29500, 7)
    for other in ("deepspeed_allreduce_buffer_0_29500_1", "deepspeed_other_0_a_1_2", "psm_1234"):
        assert parse_segment(tmp_path / other) is None


def test_only_segments_without_a_live_owner_are_removed_and_reported_in_one_line(tmp_path):
    orphans = [make_segment(tmp_path, port := free_port(), 0), make_segment(tmp_path, port, 1)]
    opened = make_segment(tmp_path, free_port())  # a rank that created its segment, not yet mapped
    mapped = make_segment(tmp_path, free_port())  # a peer that mapped it and closed the descriptor
    fresh = make_segment(tmp_path, free_port(), old=False)  # just created: maybe not in /proc yet
    with socket.socket() as store:  # a live job's rendezvous store still answers on its port
        store.bind(("127.0.0.1", 0))
        store.listen()
        served = make_segment(tmp_path, store.getsockname()[1])
        unrelated = tmp_path / "deepspeed_something_else"
        unrelated.write_bytes(b"x")
        os.utime(unrelated, (OLD, OLD))
        holder = Holder("f = open(paths[0], 'rb')\n"
                        "with open(paths[1], 'r+b') as g:\n    m = mmap.mmap(g.fileno(), 0)", opened, mapped)
        try:
            report = remove_orphaned_segments(tmp_path)
            again = remove_orphaned_segments(tmp_path)
        finally:
            holder.end()
        assert [p.exists() for p in orphans] == [False, False]
        assert all(p.exists() for p in (opened, mapped, fresh, served, unrelated))
        assert report is not None and "\n" not in report
        assert report.startswith("removed 2 orphaned DeepSpeed shared-memory segment(s)")
        assert all(p.name in report for p in orphans)
        assert again is None  # the owned ones stay: nothing more to say

        # once their processes are gone they are orphans too (the fresh one after its grace period)
        assert remove_orphaned_segments(tmp_path, min_age_s=0).startswith("removed 3 orphaned")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([served.name, unrelated.name])


def test_stale_build_lock_fails_at_once_naming_the_file_and_the_fix(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    os.utime(lock, (OLD, OLD))
    t0 = time.monotonic()
    with pytest.raises(ReformerDistError) as e:
        wait_for_build_lock(lock, timeout_s=60)
    assert time.monotonic() - t0 < 5
    message = str(e.value)
    assert "\n" not in message and str(lock) in message and f"rm {lock}" in message
    assert "no process holds it" in message


ACQUIRE = "fd = os.open(paths[0], os.O_CREAT | os.O_EXCL)\nos.utime(paths[0], (0, 0))"  # as FileBaton does


def test_a_live_build_is_waited_for_until_it_releases_the_lock(tmp_path, capsys):
    lock = tmp_path / "lock"
    # torch's own FileBaton, as cpp_extension uses it: the builder holds the lock's descriptor until release
    # (the lock is made old: the descriptor, not the grace period, is what marks the build as alive)
    builder = Holder("from torch.utils.file_baton import FileBaton\nbaton = FileBaton(paths[0])\n"
                     "assert baton.try_acquire()\nos.utime(paths[0], (0, 0))", lock, then="baton.release()")
    threading.Timer(1.0, builder.go_on).start()
    t0 = time.monotonic()
    wait_for_build_lock(lock, timeout_s=60, poll_s=0.05)
    assert time.monotonic() - t0 >= 0.9 and not lock.exists()
    builder.end()
    out = capsys.readouterr().out
    assert f"pid {builder.proc.pid} holds {lock}" in out and out.count("\n") == 1


def test_a_build_that_outlasts_the_wait_fails_naming_the_builder_and_the_lock(tmp_path):
    lock = tmp_path / "lock"
    builder = Holder(ACQUIRE, lock)
    try:
        with pytest.raises(ReformerDistError) as e:
            wait_for_build_lock(lock, timeout_s=1, poll_s=0.05)
    finally:
        builder.end()
    message = str(e.value)
    assert f"(pid {builder.proc.pid})" in message and f"kill {builder.proc.pid}" in message
    assert f"rm {lock}" in message and "\n" not in message


def test_a_build_killed_while_waited_for_leaves_a_stale_lock_that_fails_the_launch(tmp_path):
    lock = tmp_path / "lock"
    builder = Holder(ACQUIRE, lock)
    threading.Timer(0.5, builder.end).start()  # kill -9 mid-build: the lock stays, nobody holds it
    with pytest.raises(ReformerDistError, match="no process holds it"):
        wait_for_build_lock(lock, timeout_s=60, poll_s=0.05)
    assert lock.exists()


def test_a_lock_just_created_is_not_judged_stale_before_its_grace_period(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()  # as if a builder had just created it and did not show in /proc yet
    threading.Timer(FRESH_S / 2, lock.unlink).start()
    wait_for_build_lock(lock, timeout_s=60, poll_s=0.05)  # returns: no error while it was fresh

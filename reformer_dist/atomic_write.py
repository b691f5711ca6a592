"""Writing a file so that readers see the old version or the new one, never part of one, and can read it.

``atomic_write(path, write)`` has ``write(tmp)`` fill a temporary file beside ``path`` and renames it over
``path`` once complete (a crash leaves the previous file). The file then gets the mode a plain
``open(path, "w")`` would have given it: 0666 less the umask, 0644 under the usual 022. ``tempfile.mkstemp``
creates 0600 files, and so does safetensors; an artifact exported by one user must be readable by
another, such as the uid a serving container runs as.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def umask_mode(requested: int = 0o666) -> int:
    """``requested`` less this process's umask: the mode ``open()`` (0666) or ``mkdir()`` (0777) creates with."""
    umask = os.umask(0)  # the umask can only be read by setting it: put it straight back
    os.umask(umask)
    return requested & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``. ``fsync``
    forces the contents to disk before the rename (for records that mark other files complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_mode())
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), fsync=fsync)

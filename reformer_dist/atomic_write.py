"""Writing a file so that readers see the old version or the new one, never part of one, and can read it.

``atomic_write(path, write)`` has ``write(tmp)`` fill a temporary file beside ``path`` and renames it over
``path`` once complete (a crash leaves the previous file); ``atomic_directory(path)`` does the same for a
directory of files (a native model, a Triton model, a converted checkpoint). The file then gets the mode a plain
``open(path, "w")`` would have given it: 0666 less the umask, 0644 under the usual 022. ``tempfile.mkstemp``
creates 0600 files, and so does safetensors; an artifact exported by one user must be readable by
another, such as the uid a serving container runs as.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def umask_mode(requested: int = 0o666) -> int:
    """``requested`` less this process's umask: the mode ``open()`` (0666) or ``mkdir()`` (0777) creates with."""
    umask = os.umask(0)  # the umask can only be read by setting it: put it straight back
    os.umask(umask)
    return requested & ~umask


def fsync_file(path: str | os.PathLike) -> None:
    """Force ``path``'s contents to disk (before a rename names it complete)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text), fsync=fsync)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path`` (mode as ``mkdir()`` gives) to fill; when the block
    ends normally it replaces ``path`` (a previous directory is moved aside first, then removed), on an
    error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp.chmod(umask_mode(0o777))  # mkdtemp makes it owner-only
        yield tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

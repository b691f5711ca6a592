"""Reading the small files of a model directory that a user may have damaged or crafted: a JSON object,
and a path it names, refused with a :class:`CheckpointError` that names the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from reformer_dist.errors import CheckpointError, describe


def read_json_object(file: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``file``; CheckpointError "<file>: not <what> (<why>)" when the file cannot be
    read, is not UTF-8 JSON, or holds something other than an object."""
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise CheckpointError(f"{file}: not {what} ({describe(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: not {what} (expected a JSON object, got {type(value).__name__})")
    return value


def inside(directory: str | os.PathLike, name: str, source: Path) -> Path:
    """``directory / name``, refused (naming ``source``, the file that named it) if it resolves outside
    ``directory``: a model directory's files may only point at files within it."""
    root = os.path.realpath(directory)
    path = Path(directory) / name
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise CheckpointError(f"{source}: {name!r} lies outside the model directory {directory}")
    return path


def load_safetensors(file: Path) -> dict[str, Any]:
    """The tensors of a safetensors file (name -> CPU tensor); CheckpointError naming it if unreadable."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise CheckpointError(f"{file}: not a readable safetensors file ({describe(e)})") from None

"""Reading DeepSpeed checkpoints without running code from them.

A ``.pt`` file is a pickle, and unpickling calls whatever the file names: a ``__reduce__`` payload runs on
load, so opening someone else's run directory could run their code. ``torch.load(weights_only=True)``
rebuilds only tensors, primitive types, containers and an allow-list of classes, and refuses anything
else before calling it. Every checkpoint file reformer-dist reads goes through it, including the reads
DeepSpeed 0.19.8 makes itself, which all pass ``weights_only=False``:

- ``engine.load_checkpoint`` reads the model states and ZeRO optimizer partitions through the engine's
  checkpoint engine (``runtime/checkpoint_engine/torch_checkpoint_engine.py``): :func:`install` replaces
  it with :class:`WeightsOnlyCheckpointEngine`, which also names the file it cannot read.
- The universal-checkpoint load (``checkpoint/universal_checkpoint.py``, ``runtime/base_optimizer.py``,
  ``runtime/zero/stage3.py``), the conversion (``checkpoint/ds_to_universal.py``) and the consolidation
  (``utils/zero_to_fp32.py``) call ``torch.load`` themselves and offer no hook. They run inside
  :func:`weights_only_loads`, which sets torch's own switch ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` for the
  duration: ``torch.load`` reads it on every call and it overrides an explicit ``weights_only=False``
  (worker processes of the conversion inherit it). Nothing of torch or DeepSpeed is patched.

The allow-list (:data:`DEEPSPEED_TYPES`, registered with ``torch.serialization.add_safe_globals``) holds the
few non-tensor types DeepSpeed stores: loss scalers and tensor-fragment addresses (records rebuilt from
their stored attributes) and the ZeRO stage enum.

:func:`load` is the one weights-only read: a file that is truncated, foreign or holds anything else raises
a :class:`CheckpointError` that names it.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from reformer_dist.errors import CheckpointError, describe

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_types() -> list[type]:
    """The classes DeepSpeed 0.19.8 pickles into its checkpoints (found by loading checkpoints of every ZeRO
    stage and precision, and their universal conversions, with ``weights_only=True``)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def allow_deepspeed_types() -> None:
    torch.serialization.add_safe_globals(deepspeed_types())  # a set union: repeating it is harmless


def _reason(e: BaseException) -> str:
    """Why torch.load refused a file, in one line (torch's own text suggests weights_only=False)."""
    text = str(e)
    if found := re.search(r"GLOBAL (\S+)", text):
        return (f"refused: loading it would import {found.group(1)}; only tensors and plain data are loaded "
                f"from checkpoints, since unpickling anything else can run code")
    if isinstance(e, EOFError):
        return "empty or truncated"
    if "Unsupported operand" in text or "Invalid magic number" in text or "invalid load key" in text:
        return "not a PyTorch checkpoint of tensors and plain data"
    if "central directory" in text or "zip archive" in text:
        return f"truncated or corrupted ({describe(e)})"
    return describe(e)


def load(path: str | os.PathLike, map_location: Any = "cpu", required: Iterable[str] = (),
         mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with the DeepSpeed types allowed; with ``required``, the
    file must hold a dict with those keys. ``mmap`` maps the tensors instead of reading them (a cheap
    structural check). Any failure raises CheckpointError naming ``path``."""
    allow_deepspeed_types()
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols while refusing a file
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True,
                             mmap=mmap and zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as e:  # parsing untrusted bytes fails in many ways: pickle, zip, storage, ...
        raise CheckpointError(f"{path}: {_reason(e)}") from None
    missing = [key for key in required if not isinstance(obj, dict) or key not in obj]
    if missing:
        raise CheckpointError(f"{path}: not the expected kind of checkpoint file (no {', '.join(missing)})")
    return obj


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in this process (and in processes it starts) is weights-only while inside."""
    allow_deepspeed_types()
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FORCE_ENV]
        else:
            os.environ[FORCE_ENV] = before


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's default checkpoint engine, but ``load`` is :func:`load` (saving is unchanged)."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return load(path, map_location=map_location)


def install(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read through :class:`WeightsOnlyCheckpointEngine`.

    Only DeepSpeed's default engine is replaced; the other writers a DeepSpeed JSON can select (fast,
    decoupled, DataStates) call ``torch.load`` without ``weights_only``, which torch >= 2.6 treats as True.
    """
    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)

"""Shared pytest setup: GPU / TensorRT tests skip with a reason where the hardware or library is absent; the
session leaves no DeepSpeed shared-memory segment of its own launches in /dev/shm."""

from __future__ import annotations

import importlib.util
import os

import pytest

# W&B has no network here, and a run config without logging.wandb.mode follows $WANDB_MODE: tests that
# check W&B records set the mode themselves (offline); the others must not pay for a W&B run
os.environ["WANDB_MODE"] = "disabled"


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _tensorrt_importable() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401  (PyPI also carries stub packages that fail on import)
    except Exception:
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_by_this_session():
    yield
    from launch_ports import USED, segments_of

    left = segments_of(USED)  # other jobs' segments on this machine are not this session's business
    assert not left, f"this session's launches left shared-memory segments in /dev/shm: {left}"


def pytest_collection_modifyitems(config, items):
    has_cuda = _cuda_available()
    has_trt = has_cuda and _tensorrt_importable()
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
        if item.get_closest_marker("tensorrt") and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT and a CUDA GPU (import tensorrt failed or no GPU)"))


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """A 2-step training run of a micro Reformer and its exports (see micro_run.py); do not modify it."""
    from micro_run import build

    return build(tmp_path_factory.mktemp("micro_run"))

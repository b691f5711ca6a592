"""What the package and its images deliver outside a source checkout (no Docker engine runs here: the
images are linted in test_docker.py, and the facts they rely on are checked here).

- The wheel holds every module and the run configs; installed non-editable into a fresh environment,
  ``reformer-dist config --config base`` resolves the bare name.
- Everything training and export write is readable by other users under the usual umask (a serving
  container runs as another uid), and the umask is respected.
- The serving image's package set (Dockerfile.serve, no training stack) serves an exported model.
- The training image installs no deployment extra and works in the directory its docs mount.

A fresh environment costs no download: it is a ``venv --without-pip`` into which this environment's pip
installs the wheel alone (``--no-deps``), and whose dependencies are made visible by a ``.pth`` file naming
a directory of links to exactly the distributions wanted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
SITE_PACKAGES = Path(metadata.distribution("torch").locate_file(""))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (a build leaves build/ and egg-info beside them)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("reformer_dist", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True, timeout=300)
    return next(out.glob("reformer_dist-*.whl"))


def fresh_env(root: Path, wheel: Path, dependencies: Path) -> Path:
    """A venv with the wheel installed non-editable; ``dependencies`` (a site directory) is on its path."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(f"{dependencies}\n")
    return python


# ---------------------------------------------------------------------------------------------- wheel
def test_wheel_holds_every_module_and_the_run_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "reformer_dist").rglob("*.py")}
    configs = {f"reformer_dist/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    assert configs and {"reformer_dist/configs/base.yaml", "reformer_dist/configs/tiny.yaml"} <= configs
    assert sources | configs <= names, sorted((sources | configs) - names)


@pytest.mark.slow
def test_non_editable_install_resolves_bare_config_names(wheel, tmp_path):
    python = fresh_env(tmp_path / "venv", wheel, SITE_PACKAGES)  # this environment's packages as dependencies
    out = subprocess.run([str(tmp_path / "venv" / "bin" / "reformer-dist"), "config", "--config", "base"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "d_model: 512" in out.stdout and "seq_len: 16384" in out.stdout  # configs/base.yaml's values
    where = subprocess.run([str(python), "-c", "import reformer_dist.config_files as c; print(c.__file__, c.CONFIG_DIR)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert str(REPO) not in where and str(tmp_path / "venv") in where  # the installed copy, not the checkout


# ------------------------------------------------------------------------------------------ file modes
def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}


def test_training_and_export_write_files_others_can_read(micro_run):
    # the session's umask is the usual 022: config.yaml, checkpoints, the native model, the ONNX graph, the
    # HF directory, data shards and manifest were all written by the commands and writers under test
    written = modes(micro_run)
    assert {"run/config.yaml", "run/native/model.safetensors", "model.onnx", "hf/model.safetensors",
            "data/manifest.json"} <= set(written)
    # readable by group and others, writable by the owner only (DeepSpeed's zero_to_fp32.py copies are 0744)
    assert {name: oct(mode) for name, mode in written.items() if mode & 0o644 != 0o644 or mode & 0o022} == {}


def test_writers_respect_the_umask(micro_run, tmp_path):
    import onnx

    from reformer_dist.artifacts.hf_checkpoint import from_hf, save_hf
    from reformer_dist.artifacts.native import save_native
    from reformer_dist.export.onnx_graph import save_model
    from reformer_dist.export.triton_repo import write_triton_repo
    from reformer_dist.run_config import load_config, save_config

    previous = os.umask(0o027)
    try:
        model = from_hf(micro_run / "hf")
        save_native(model, tmp_path / "native", {"kind": "bytes", "offset": 0})
        save_hf(model, tmp_path / "hf")
        save_config(load_config([str(micro_run / "micro.yaml")]), tmp_path / "config.yaml")
        save_model(onnx.load(str(micro_run / "model.onnx")), tmp_path / "model.onnx")
        write_triton_repo(str(tmp_path / "model.onnx"), str(tmp_path / "repo"))
    finally:
        os.umask(previous)
    written = modes(tmp_path)
    assert len(written) >= 8 and set(written.values()) == {0o640}, written
    assert (tmp_path / "repo" / "reformer").stat().st_mode & 0o777 == 0o750


# ---------------------------------------------------------------------------------------- serve image
def serve_image_requirements() -> list[Requirement]:
    """The packages Dockerfile.serve installs besides the project (CPU onnxruntime for the -gpu build)."""
    text = (DOCKER / "Dockerfile.serve").read_text()
    quoted = re.findall(r'"([A-Za-z][\w.\-]*(?:\[[\w,]+\])?[<>=!~][^"]*)"', text)
    assert "onnxruntime-gpu>=1.20" in quoted and "fastapi>=0.115" in quoted, quoted
    return [Requirement(r.replace("onnxruntime-gpu", "onnxruntime")) for r in quoted]


def closure(requirements: list[Requirement]) -> set[str]:
    """The installed distributions these requirements resolve to, with their dependencies (markers applied)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = metadata.distribution(req.name).metadata["Name"]
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for text in metadata.requires(name) or []:
            dep = Requirement(text)
            if dep.marker is None or dep.marker.evaluate({"extra": ""}):
                todo.append(dep)
    return seen


def link_distributions(names: set[str], target: Path) -> None:
    """A site directory holding (links to) exactly these installed distributions."""
    target.mkdir()
    for name in names:
        for file in metadata.distribution(name).files or []:
            top = file.parts[0]
            if top != ".." and not (target / top).exists() and (SITE_PACKAGES / top).exists():
                (target / top).symlink_to(SITE_PACKAGES / top)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_image_package_set_serves_an_exported_model(wheel, micro_run, tmp_path):
    packages = closure(serve_image_requirements())
    assert not packages & {"deepspeed", "wandb"}  # the point of the image: no training stack
    link_distributions(packages, tmp_path / "site")
    fresh_env(tmp_path / "venv", wheel, tmp_path / "site")
    port = free_port()
    server = subprocess.Popen([str(tmp_path / "venv" / "bin" / "reformer-dist"), "serve", "--model",
                               str(micro_run / "model.onnx"), "--backend", "onnxruntime", "--port", str(port)],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        body = json.dumps({"prompt": "the reformer", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert reply["usage"]["completion_tokens"] == 4 and isinstance(reply["choices"][0]["text"], str)
    finally:
        server.terminate()
        server.wait(timeout=60)


# ---------------------------------------------------------------------------------------- train image
def test_train_image_installs_no_deployment_extra_and_runs_where_its_docs_mount():
    text = (DOCKER / "Dockerfile.train").read_text()
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and all(not re.search(r"\.\[|tensorrt|onnxruntime-gpu|triton", line) for line in installs)
    mount = re.search(r"-v \$PWD/runs:(\S+)", text).group(1)
    workdir = re.findall(r"^WORKDIR (\S+)", text, flags=re.MULTILINE)[-1]  # where commands run
    assert Path(workdir) / "runs" == Path(mount)  # relative output paths (runs/...) land in the mount

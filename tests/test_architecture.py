"""The house rules of ARCHITECTURE.md, checked on the source: which layer may import which, no import
cycles, no mocks in library code, and every config field read by the code it configures."""

from __future__ import annotations

import ast
import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import pytest

from reformer_dist.export.config import ExportConfig
from reformer_dist.run_config import JobConfig
from reformer_dist.serve.config import ServeConfig
from reformer_dist.train.config import WandbConfig

PACKAGE = Path(__file__).resolve().parent.parent / "reformer_dist"

# layer -> the layers it must not import (ARCHITECTURE.md, "What may import what")
FORBIDDEN = {
    "model": {"data", "artifacts", "train", "export", "decoding", "serve", "commands"},
    "data": {"model", "artifacts", "train", "export", "decoding", "serve", "commands"},
    "artifacts": {"train", "export", "decoding", "serve", "commands"},
    "train": {"export", "serve", "commands"},  # train may sample through decoding's PyTorch path (no ONNX)
    "export": {"train", "serve", "commands"},
    "decoding": {"train", "serve", "commands"},
    "serve": {"train", "export", "commands"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    """The reformer_dist modules ``path`` imports, at module level or inside functions, except those
    imported for type checking only (``if TYPE_CHECKING:``): what can run when the module is used."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                for alias in child.names:  # `from pkg import module` imports the module
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(path) for name, path in MODULES.items()}


def layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_layers_import_only_what_the_architecture_allows():
    broken = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
              if layer(b) in FORBIDDEN.get(layer(a), ())]
    assert not broken, "imports across forbidden layer boundaries:\n" + "\n".join(sorted(broken))


@pytest.mark.parametrize(("entry", "absent"), [
    ("reformer_dist.train.trainer", ("onnx", "onnxruntime", "reformer_dist.export", "reformer_dist.serve")),
    ("reformer_dist.serve.app", ("deepspeed", "wandb", "reformer_dist.train")),
    ("reformer_dist.export.onnx_export", ("deepspeed", "wandb", "reformer_dist.train")),
])
def test_a_layer_does_not_load_what_it_must_not_know_at_run_time(entry, absent):
    # the edges above are direct; this follows everything importing the layer really loads
    code = f"import sys, {entry}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert not loaded, f"importing {entry} loads {loaded}"


def test_the_import_graph_has_no_cycles():
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


def test_library_code_uses_no_mocks():
    users = [str(p) for p in PACKAGE.rglob("*.py") if "unittest.mock" in p.read_text() or "from unittest import mock"
             in p.read_text()]
    assert not users


SECTIONS = sorted({type(getattr(JobConfig(), f.name)) for f in dataclasses.fields(JobConfig)}
                  | {WandbConfig, ExportConfig, ServeConfig}, key=lambda c: c.__name__)


@functools.cache
def attribute_reads() -> frozenset[str]:
    """Attribute names read anywhere in the package outside the sections' own ``validate`` methods."""
    reads: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        checks = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "validate"
                  for n in ast.walk(f)}
        reads.update(n.attr for n in ast.walk(tree)
                     if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and id(n) not in checks)
    return frozenset(reads)


@pytest.mark.parametrize("section", SECTIONS, ids=lambda c: c.__name__)
def test_every_config_field_is_read_by_the_code(section):
    unread = [f.name for f in dataclasses.fields(section) if f.name not in attribute_reads()]
    assert not unread, f"{section.__name__} fields nothing reads (dead config): {unread}"

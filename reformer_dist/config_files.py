"""YAML config files and ``key=value`` overrides, merged into the typed sections a command needs.

One config file may hold every section (``model:``, ``data:``, ``train:``, ``deepspeed:``, ``logging:`` for
training, ``export:`` for ``export onnx``, ``serve:`` for ``serve``); each command loads only its own
sections through :func:`load_section` and leaves the others alone, so ``serve`` never imports the
training configs. OmegaConf structured configs check the types; every failure is a :class:`ConfigError`
naming the key::

    serve = load_section("serve", ServeConfig, ["configs/tiny.yaml"], ["serve.port=9000"])
    serve.port  # 9000
"""

from __future__ import annotations

import ast
import difflib
import importlib.resources
import inspect
import itertools
import textwrap
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from reformer_dist.errors import ConfigError

# The repository's configs/ directory, installed as the package reformer_dist.configs (see pyproject.toml)
CONFIG_DIR = Path(str(importlib.resources.files("reformer_dist.configs")))

SECTIONS = ("model", "data", "train", "deepspeed", "logging", "export", "serve")
"""Every section a config file may hold; a command reads its own and skips the others."""


def resolve_config_path(name: str) -> Path:
    """A config file path, or a bare name like 'tiny' looked up in the packaged configs/ directory."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("--config", f"no such config file {name!r} (looked in . and {CONFIG_DIR})")


def _suggest(key: str, node: Any, extra: tuple[str, ...] = ()) -> str:
    """' (did you mean 'x'?)' for an unknown dotted key, using the valid keys at its level."""
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            break
        node = node[part]
    if not isinstance(node, DictConfig):
        return ""
    names = [str(k) for k in node] + (list(extra) if len(parts) == 1 else [])
    close = difflib.get_close_matches(parts[-1], names, n=1, cutoff=0.6)
    prefix = ".".join(parts[:-1])
    return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(key, f"unknown key in {source}{_suggest(key, base)}") from None
    except ValidationError as e:
        raise ConfigError(e.full_key or "?", f"wrong type in {source}: {e.msg.splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(getattr(e, "full_key", None) or "?", f"{source}: {e}") from None


def merge_sections(schema: DictConfig, loaded: DictConfig, source: str) -> DictConfig:
    """``schema`` merged with the sections of ``loaded`` it has; the other commands' sections are skipped,
    an unknown section is an error."""
    for key in loaded:
        if key not in SECTIONS:
            raise ConfigError(str(key), f"unknown section in {source}{_suggest(str(key), schema, SECTIONS)}; "
                                        f"sections: {list(SECTIONS)}")
    return _merge(schema, OmegaConf.masked_copy(loaded, [k for k in loaded if k in schema]), source)


def merge_config_files(schema: DictConfig, files: list[str] | None, overrides: list[str] | None) -> DictConfig:
    """``schema`` (a structured config whose keys are sections) merged with each YAML file in order, then
    the ``key=value`` overrides; sections outside the schema are skipped in files and refused in overrides."""
    for name in files or []:
        path = resolve_config_path(name)
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in many types
            raise ConfigError(str(path), f"cannot parse YAML: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(str(path), f"must be a mapping of sections ({', '.join(SECTIONS)})")
        schema = merge_sections(schema, loaded, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key=value, e.g. train.max_steps=100")
        key = item.split("=", 1)[0].strip()
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(key, f"cannot parse override: {e}") from None
        schema = _merge(schema, dotlist, f"override {item!r}")
    return schema


def load_section(name: str, section: type, files: list[str] | None = None, overrides: list[str] | None = None):
    """The ``name`` section as an instance of the dataclass ``section`` (defaults < files < overrides),
    checked by its ``validate()``; the files' other sections are skipped."""
    schema = OmegaConf.create({name: OmegaConf.structured(section)})
    merged = merge_config_files(schema, files, overrides)
    try:
        value = OmegaConf.to_object(merged[name])
    except OmegaConfBaseException as e:
        raise ConfigError(getattr(e, "full_key", None) or name, str(e)) from None
    return value.validate()


def field_docs(section: type) -> dict[str, str]:
    """Field name → docstring of a section dataclass (read from the attribute docstrings in its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(section)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs

"""The run configuration: typed sections merged from YAML files and ``key=value`` overrides.

Each concern owns its section dataclass (``model`` → :class:`ReformerConfig`, ``data`` → ``DataConfig``,
``train``/``deepspeed``/``logging`` → the training configs, ``export``, ``serve``). This module only merges
them — OmegaConf structured configs give type checking — and turns every failure into a
:class:`ConfigError` that names the key::

    cfg = load_config(["configs/tiny.yaml"], ["train.max_steps=100", "model.n_layers=4"])
"""

from __future__ import annotations

import difflib
import importlib.resources
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from reformer_dist.atomic_write import write_text_atomic
from reformer_dist.data.config import DataConfig
from reformer_dist.errors import ConfigError
from reformer_dist.export.config import ExportConfig
from reformer_dist.model.config import ReformerConfig
from reformer_dist.serve.config import ServeConfig
from reformer_dist.train.config import DeepSpeedConfig, LoggingConfig, TrainConfig

# The repository's configs/ directory, installed as the package reformer_dist.configs (see pyproject.toml)
CONFIG_DIR = Path(str(importlib.resources.files("reformer_dist.configs")))


@dataclass
class JobConfig:
    model: ReformerConfig = field(default_factory=ReformerConfig)
    """Model hyper-parameters."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prepared token shards to train and evaluate on."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop: steps, batch, optimiser, evaluation, checkpoints."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine: ZeRO stage, offload, precision."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Experiment tracking."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """ONNX / TensorRT export defaults."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """HTTP server defaults."""

    def validate(self) -> JobConfig:
        """Check each section, then the constraints that span sections."""
        self.model.validate()
        self.train.validate()
        self.deepspeed.validate()
        self.logging.validate()
        self.serve.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError("train.seq_len", f"{self.train.seq_len} exceeds model.max_seq_len="
                                               f"{self.model.max_seq_len} (the positional table size)")
        multiple = self.model.pad_multiple()
        if self.train.seq_len % multiple:
            # The model pads any length, but padding a training batch wastes compute on every step and
            # with 'chunk' windows changes which keys share a chunk: insist on a length the chunks serve.
            raise ConfigError("train.seq_len", f"{self.train.seq_len} is not a multiple of the chunk length "
                                               f"{multiple} (lcm of model.lsh_chunk_len and model.local_chunk_len)")
        sp = self.deepspeed.sequence_parallel_size
        if self.model.n_heads % sp:
            raise ConfigError("model.n_heads", f"{self.model.n_heads} is not divisible by deepspeed.sequence_parallel_"
                                               f"size={sp} (each rank of a group attends over n_heads/{sp} heads)")
        if self.train.seq_len % sp:
            raise ConfigError("train.seq_len", f"{self.train.seq_len} is not divisible by deepspeed.sequence_parallel_"
                                               f"size={sp} (each rank of a group holds seq_len/{sp} positions); use a "
                                               f"multiple of {math.lcm(multiple, sp)}")
        return self


def _suggest(key: str, node: Any) -> str:
    """' (did you mean 'x'?)' for an unknown dotted key, using the valid keys at its level."""
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            break
        node = node[part]
    if not isinstance(node, DictConfig):
        return ""
    close = difflib.get_close_matches(parts[-1], [str(k) for k in node], n=1, cutoff=0.6)
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


def resolve_config_path(name: str) -> Path:
    """A config file path, or a bare name like 'tiny' looked up in the packaged configs/ directory."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("--config", f"no such config file {name!r} (looked in . and {CONFIG_DIR})")


def load_config(files: list[str] | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Merge the defaults, each YAML file in order, then ``key=value`` overrides; validate; return typed."""
    cfg = OmegaConf.structured(JobConfig)
    for name in files or []:
        path = resolve_config_path(name)
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come in many types
            raise ConfigError(str(path), f"cannot parse YAML: {e}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(str(path), "must be a mapping of sections (model:, train:, ...)")
        cfg = _merge(cfg, loaded, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key=value, e.g. train.max_steps=100")
        key = item.split("=", 1)[0].strip()
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise ConfigError(key, f"cannot parse override: {e}") from None
        cfg = _merge(cfg, dotlist, f"override {item!r}")
    try:
        job: JobConfig = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(getattr(e, "full_key", None) or "?", str(e)) from None
    return job.validate()


def config_to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML (what is printed at start and saved next to every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_from_dict(data: dict) -> JobConfig:
    """A JobConfig from a plain mapping (e.g. a saved config.yaml already parsed), validated."""
    merged = _merge(OmegaConf.structured(JobConfig), OmegaConf.create(data), "saved config")
    return OmegaConf.to_object(merged).validate()


def save_config(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temp file + rename, mode as open() gives)."""
    write_text_atomic(path, config_to_yaml(cfg))


def field_docs(section: type) -> dict[str, str]:
    """Field name → docstring of a section dataclass (read from the attribute docstrings in its source)."""
    import ast
    import inspect
    import itertools
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(section)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


__all__ = ["JobConfig", "config_from_dict", "config_to_yaml", "field_docs", "load_config", "save_config"]

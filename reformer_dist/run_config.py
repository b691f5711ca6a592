"""The training run's configuration: the sections ``reformer-dist train`` (and eval, plan, config) reads.

Each concern owns its section dataclass (``model`` → :class:`ReformerConfig`, ``data`` → ``DataConfig``,
``train``/``deepspeed``/``logging`` → the training configs); ``config_files`` merges them from YAML files and
``key=value`` overrides (OmegaConf structured configs give type checking) and turns every failure into a
:class:`ConfigError` that names the key. The ``export:`` and ``serve:`` sections of the same files belong to
their commands (``config_files.load_section``)::

    cfg = load_config(["configs/tiny.yaml"], ["train.max_steps=100", "model.n_layers=4"])
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from reformer_dist.atomic_write import write_text_atomic
from reformer_dist.config_files import merge_config_files, merge_sections
from reformer_dist.data.config import DataConfig
from reformer_dist.errors import ConfigError
from reformer_dist.model.config import ReformerConfig
from reformer_dist.train.config import DeepSpeedConfig, LoggingConfig, TrainConfig


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

    def validate(self) -> JobConfig:
        """Check each section, then the constraints that span sections."""
        self.model.validate()
        self.train.validate()
        self.deepspeed.validate()
        self.logging.validate()
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


def load_config(files: list[str] | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Merge the defaults, each YAML file in order, then ``key=value`` overrides; validate; return typed."""
    cfg = merge_config_files(OmegaConf.structured(JobConfig), files, overrides)
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
    merged = merge_sections(OmegaConf.structured(JobConfig), OmegaConf.create(data), "saved config")
    return OmegaConf.to_object(merged).validate()


def save_config(cfg: JobConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML atomically (temp file + rename, mode as open() gives)."""
    write_text_atomic(path, config_to_yaml(cfg))


__all__ = ["JobConfig", "config_from_dict", "config_to_yaml", "load_config", "save_config"]

"""The native model directory: what training consolidates to and export, serving and generation load.

::

    model.safetensors   fp32 tensors named exactly as ReformerLM.state_dict(); metadata format=reformer-dist-native
    config.yaml         a run config whose ``model:`` section is the ReformerConfig (other sections ignored)
    tokenizer.json      optional tokenizer spec ({"kind": "bytes", "offset": 2}, or a kind plus a "path"
                        relative to the directory naming a tokenizer file copied next to it; ``tokenizer_spec``)

A training run keeps its consolidated model in ``RUN_DIR/native`` (:data:`RUN_NATIVE_DIR`).
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reformer_dist.artifacts import tokenizer_spec
from reformer_dist.artifacts.files import load_safetensors
from reformer_dist.atomic_write import atomic_directory, atomic_write
from reformer_dist.errors import CheckpointError, ReformerDistError, describe

if TYPE_CHECKING:
    from reformer_dist.model.config import ReformerConfig
    from reformer_dist.model.reformer import ReformerLM

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"
NATIVE_FORMAT = "reformer-dist-native"
RUN_NATIVE_DIR = "native"  # RUN_DIR/native: where training writes the consolidated model


def is_native_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / WEIGHTS).is_file() and (Path(path) / CONFIG).is_file()


def save_native(model: ReformerLM, path: str | os.PathLike, tokenizer: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and its tokenizer spec, copying a tokenizer file) as a native directory.

    The directory is assembled under a temporary name and renamed into place only when complete, so
    an interrupted save leaves any previous directory at ``path`` intact.
    """
    import yaml
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().to("cpu").float().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_directory(path) as tmp:
        # safetensors writes 0600 files; atomic_write gives the mode open() would (the directory is shared)
        atomic_write(tmp / WEIGHTS, lambda file: save_file(state, file, metadata={"format": NATIVE_FORMAT,
                                                                                 "version": "1"}))
        (tmp / CONFIG).write_text(yaml.safe_dump({"model": asdict(model.config)}, sort_keys=False))
        if tokenizer is not None:
            tokenizer_spec.write_native(tokenizer, tmp)
    return path


def model_config_from_yaml(text: str, source: str) -> ReformerConfig:
    """The ReformerConfig of a run config's ``model:`` section (a native directory's ``config.yaml`` or a
    training run's); CheckpointError naming ``source`` if there is no valid one."""
    import yaml

    from reformer_dist.model.config import ReformerConfig

    try:
        return ReformerConfig(**yaml.safe_load(text)["model"]).validate()
    except (KeyError, TypeError, ValueError, yaml.YAMLError, ReformerDistError) as e:
        raise CheckpointError(f"{source}: no valid model section ({describe(e)})") from None


def from_native(path: str | os.PathLike) -> ReformerLM:
    """The ReformerLM (fp32, eval mode) of a native directory; CheckpointError names what is wrong."""
    path = Path(path)
    if not is_native_dir(path):
        raise CheckpointError(f"{path}: not a native model directory ({WEIGHTS} + {CONFIG})")
    try:
        text = (path / CONFIG).read_text()
    except (OSError, ValueError) as e:  # ValueError: not UTF-8
        raise CheckpointError(f"{path / CONFIG}: unreadable ({describe(e)})") from None
    config = model_config_from_yaml(text, str(path / CONFIG))
    return model_with_weights(config, load_safetensors(path / WEIGHTS), f"the weights in {path / WEIGHTS}",
                              str(path / CONFIG))


def model_with_weights(config: ReformerConfig, state_dict: dict[str, Any], weights_source: str,
                       config_source: str) -> ReformerLM:
    """The ReformerLM (eval mode) of ``config`` holding ``state_dict``, loaded strictly: weights that do not
    fit are refused with a CheckpointError naming both sources."""
    from reformer_dist.model.reformer import ReformerLM

    model = ReformerLM(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights_source} do not match {config_source}: {describe(e)}") from None
    return model.eval()

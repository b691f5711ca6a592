"""The run config: YAML files + key=value overrides, and errors that name the offending key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reformer_dist.config_files import field_docs, load_section
from reformer_dist.errors import ConfigError
from reformer_dist.export.config import ExportConfig
from reformer_dist.run_config import (
    JobConfig,
    config_from_dict,
    config_to_yaml,
    load_config,
    save_config,
)
from reformer_dist.serve.config import ServeConfig
from reformer_dist.train.config import WandbConfig

REPO = Path(__file__).resolve().parent.parent


def error_for(overrides: list[str], files: list[str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(files or [], overrides)
    return info.value


def test_shipped_configs_load_and_validate():
    for name in ("tiny", "base", "enwik8"):
        cfg = load_config([name])
        assert cfg.model.n_layers == len(cfg.model.layer_kinds())
    enwik8 = load_config(["enwik8"]).model
    assert (enwik8.n_layers, enwik8.d_model, enwik8.d_ff, enwik8.n_heads, enwik8.lsh_n_hashes) == (12, 1024, 4096, 8, 4)
    assert {"lsh", "local"} == set(enwik8.attn_layers)


def test_overrides_are_applied_after_files_in_order(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("train:\n  max_steps: 11\n  lr: 0.5\n")
    cfg = load_config(["tiny", str(extra)], ["train.max_steps=100", "model.n_layers=2"])
    assert cfg.train.max_steps == 100  # the override wins over both files
    assert cfg.train.lr == 0.5  # the second file wins over the first
    assert cfg.model.n_layers == 2


def test_unknown_key_is_named_with_a_close_match():
    err = error_for(["train.max_stpes=3"])
    assert err.key == "train.max_stpes"
    assert "did you mean 'train.max_steps'" in str(err)


def test_unknown_key_in_a_yaml_file_names_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_modle: 64\n")
    err = error_for([], [str(bad)])
    assert err.key == "model.d_modle" and "bad.yaml" in str(err) and "model.d_model" in str(err)


def test_wrong_type_names_the_key():
    err = error_for(["train.micro_batch_size=four"])
    assert err.key == "train.micro_batch_size"
    assert "wrong type" in str(err)


@pytest.mark.parametrize("override,key", [
    ("model.dropout=1.5", "model.dropout"),
    ("train.max_steps=0", "train.max_steps"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("deepspeed.precision=fp8", "deepspeed.precision"),
    ("logging.wandb.mode=sometimes", "logging.wandb.mode"),
    ("model.lsh_n_buckets=7", "model.lsh_n_buckets"),
    ("model.attn_layers=[lsh,sparse]", "model.attn_layers"),
])
def test_out_of_range_values_name_the_key(override, key):
    assert error_for([override]).key == key


def test_sequence_length_the_chunks_cannot_serve_is_rejected():
    err = error_for(["model.lsh_chunk_len=64", "model.local_chunk_len=48", "train.seq_len=256"])
    assert err.key == "train.seq_len" and "192" in str(err)  # lcm(64, 48) = 192


def test_sequence_longer_than_the_positional_table_is_rejected():
    err = error_for(["model.max_seq_len=1024", "model.axial_pos_shape=[32,32]", "train.seq_len=2048"])
    assert err.key == "train.seq_len" and "max_seq_len" in str(err)


def test_inconsistent_model_fields_are_rejected():
    assert error_for(["model.n_layers=5", "model.attn_layers=[local,lsh]"]).key == "model.attn_layers"
    assert error_for(["model.axial_pos_dims=[64,64]"]).key == "model.axial_pos_dims"
    assert error_for(["model.lsh_chunks_after=1"]).key == "model.lsh_chunks_after"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["tiny"], ["train.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    import yaml

    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert config_to_yaml(again) == config_to_yaml(cfg)


def test_every_config_field_has_a_docstring():
    sections = [JobConfig, *(type(getattr(JobConfig(), f)) for f in JobConfig.__dataclass_fields__), WandbConfig,
                ExportConfig, ServeConfig]
    for section in sections:
        docs = field_docs(section)
        missing = [f for f in section.__dataclass_fields__ if not docs.get(f)]
        assert not missing, f"{section.__name__} fields without a docstring: {missing}"


def test_cli_prints_merged_config_and_reports_errors_without_traceback():
    run = [sys.executable, "-m", "reformer_dist", "config", "--config", "tiny", "train.max_steps=42"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "max_steps: 42" in out and "d_model: 128" in out
    bad = subprocess.run([*run[:-1], "train.max_steps=-1"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "train.max_steps" in bad.stderr and "Traceback" not in bad.stderr


def test_each_command_reads_its_own_section_of_a_shared_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {d_model: 64}\nexport: {precision: int8}\nserve: {port: 9000}\n")
    assert load_config([str(path)]).model.d_model == 64  # training skips export: and serve:
    assert load_section("export", ExportConfig, [str(path)]).precision == "int8"
    assert load_section("serve", ServeConfig, [str(path)], ["serve.max_batch_size=2"]).max_batch_size == 2

    path.write_text("export: {precision: fp8}\n")
    with pytest.raises(ConfigError, match=r"export\.precision"):
        load_section("export", ExportConfig, [str(path)])
    path.write_text("exprot: {precision: int8}\n")
    with pytest.raises(ConfigError, match=r"exprot.*did you mean 'export'"):
        load_config([str(path)])

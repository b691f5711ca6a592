"""Files a user hands reformer-dist: every loader refuses a bad one with one line naming it, and no
checkpoint file can run code when it is loaded.

The fixture (``micro_run``, built once per session: see micro_run.py) is a 2-step ZeRO-1 training run
of a micro Reformer, its ONNX export, a Hugging Face directory and a tokenizers JSON file. Each case copies it, damages one file (truncated to
half, overwritten with random bytes of the same size, or replaced by another kind of file from the same
fixture) and runs one command that reads that file in-process through the CLI's ``main``: exit status 2,
one line on stderr that names the file, no traceback. Training must refuse before any process group
exists and serving before it binds a port (both are replaced by a failing stub, so a missed case fails
instead of training or serving).
"""

from __future__ import annotations

import contextlib
import random
import shutil
from pathlib import Path

import pytest
import torch
from micro_run import STEP

from reformer_dist.cli import main


@pytest.fixture
def fixture(micro_run: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture to damage."""
    shutil.copytree(micro_run, tmp_path / "f", ignore=shutil.ignore_patterns("corpus"))
    return tmp_path / "f"


@pytest.fixture(autouse=True)
def no_process_group_no_server(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("reached past the loaders: the damaged file was not refused")

    monkeypatch.setattr("reformer_dist.train.trainer.init_distributed", refuse)
    monkeypatch.setattr("reformer_dist.serve.server.run_server", refuse)


# ------------------------------------------------------------------------------------------- commands
def train_cmd(f: Path) -> list[str]:
    return ["train", "--config", str(f / "micro.yaml"), f"data.path={f / 'data'}", f"train.output_dir={f / 'run'}",
            "train.max_steps=4", "data.verify_checksums=true"]


def eval_cmd(f: Path) -> list[str]:
    return ["eval", str(f / "run"), f"data.path={f / 'data'}", "data.verify_checksums=true"]


def export_native(f: Path) -> list[str]:
    return ["export", "onnx", "--checkpoint", str(f / "run"), "--output", str(f / "out.onnx")]


def export_hf(f: Path) -> list[str]:
    return ["export", "onnx", "--checkpoint", str(f / "hf"), "--output", str(f / "out.onnx")]


def export_tokenizer(f: Path) -> list[str]:
    return [*export_native(f), "--tokenizer", str(f / "tok.json")]


def check_cmd(f: Path) -> list[str]:
    return ["export", "check", str(f / "model.onnx"), "--target", "onnxruntime"]


GENERATE = ["generate", "--prompt", "the reformer", "--max-new-tokens", "2", "--seed", "0"]


def generate_native(f: Path) -> list[str]:
    return [*GENERATE, "--checkpoint", str(f / "run")]


def generate_hf(f: Path) -> list[str]:
    return [*GENERATE, "--checkpoint", str(f / "hf")]


def generate_onnx(f: Path) -> list[str]:
    return [*GENERATE, "--model", str(f / "model.onnx")]


def generate_tokenizer(f: Path) -> list[str]:
    return [*generate_native(f), "--tokenizer", str(f / "tok.json")]


def serve_native(f: Path) -> list[str]:
    return ["serve", "--model", str(f / "run"), "--backend", "torch", "--port", "0"]


def serve_hf(f: Path) -> list[str]:
    return ["serve", "--model", str(f / "hf"), "--backend", "torch", "--port", "0"]


def serve_onnx(f: Path) -> list[str]:
    return ["serve", "--model", str(f / "model.onnx"), "--backend", "onnxruntime", "--port", "0"]


def serve_tokenizer(f: Path) -> list[str]:
    return [*serve_native(f), "--tokenizer", str(f / "tok.json")]


def convert_native(f: Path) -> list[str]:
    return ["convert", "--from", "native", "--to", "hf", "--input", str(f / "run"), "--output", str(f / "out")]


def convert_hf(f: Path) -> list[str]:
    return ["convert", "--from", "hf", "--to", "native", "--input", str(f / "hf"), "--output", str(f / "out")]


# artifact -> (its path in the fixture, the file that replaces it in the wrong-type case, commands reading it)
NATIVE_READERS = (export_native, generate_native, serve_native, convert_native)
HF_READERS = (export_hf, generate_hf, serve_hf, convert_hf)
ARTIFACTS = {
    "model-states": (f"run/{STEP}/mp_rank_00_model_states.pt", f"run/{STEP}/rng_rank00000.pt", (train_cmd, eval_cmd)),
    "optimizer-shard": (f"run/{STEP}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                        f"run/{STEP}/mp_rank_00_model_states.pt", (train_cmd, eval_cmd)),
    "rng-file": (f"run/{STEP}/rng_rank00000.pt", f"run/{STEP}/mp_rank_00_model_states.pt", (train_cmd, eval_cmd)),
    "meta.json": (f"run/{STEP}/meta.json", f"run/{STEP}/config.yaml", (train_cmd, eval_cmd)),
    "latest": ("run/latest", f"run/{STEP}/meta.json", (train_cmd, eval_cmd)),
    "checkpoint-config": (f"run/{STEP}/config.yaml", f"run/{STEP}/meta.json", (eval_cmd,)),
    "manifest": ("data/manifest.json", f"run/{STEP}/meta.json", (train_cmd, eval_cmd)),
    "train-shard": ("data/train-00000.bin", "run/native/model.safetensors", (train_cmd,)),
    "val-shard": ("data/val-00000.bin", "run/native/model.safetensors", (eval_cmd,)),
    "native-weights": ("run/native/model.safetensors", f"run/{STEP}/mp_rank_00_model_states.pt", NATIVE_READERS),
    "native-config": ("run/native/config.yaml", "run/native/tokenizer.json", NATIVE_READERS),
    "native-tokenizer-spec": ("run/native/tokenizer.json", "run/native/config.yaml", NATIVE_READERS),
    "hf-config": ("hf/config.json", "run/native/config.yaml", HF_READERS),
    "hf-weights": ("hf/model.safetensors", "run/native/model.safetensors", HF_READERS),
    "onnx": ("model.onnx", "run/native/model.safetensors", (check_cmd, generate_onnx, serve_onnx)),
    "tokenizer-file": ("tok.json", "data/manifest.json", (export_tokenizer, generate_tokenizer, serve_tokenizer)),
}


def damage(f: Path, target: Path, how: str, wrong_type: Path) -> None:
    data = target.read_bytes()
    if how == "truncated":
        target.write_bytes(data[:len(data) // 2])
    elif how == "random":
        target.write_bytes(random.Random(len(data)).randbytes(len(data)))
    else:
        shutil.copyfile(wrong_type, target)


CASES = [pytest.param(artifact, how, cmd, id=f"{artifact}-{how}-{cmd.__name__}")
         for artifact, (_, _, cmds) in ARTIFACTS.items() for cmd in cmds
         for how in ("truncated", "random", "wrong-type")]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("artifact", "how", "cmd"), CASES)
def test_damaged_file_is_refused_with_one_line_naming_it(artifact, how, cmd, fixture, capsys):
    path, wrong, _ = ARTIFACTS[artifact]
    target = fixture / path
    damage(fixture, target, how, fixture / wrong)
    code, err = run_cli(cmd(fixture), capsys)
    errors = [line for line in err.splitlines() if line.startswith("reformer-dist ")]
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    assert str(target) in errors[0], errors[0]


def test_eval_of_a_missing_directory_names_it_not_a_config_key(tmp_path, capsys):
    code, err = run_cli(["eval", str(tmp_path / "missing")], capsys)
    assert code == 2 and err == f"reformer-dist eval: error: {tmp_path / 'missing'}: no such checkpoint or run directory\n"


# ------------------------------------------------------------------------------------- pickle payloads
class Payload:
    """Unpickling this object runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def plant(file: Path, marker: Path) -> None:
    """Replace a checkpoint file by a pickle holding the keys the file should have, plus the payload."""
    from reformer_dist.train.checkpoint import required_keys

    torch.save({**{key: {} for key in required_keys(file)}, "payload": Payload(marker)}, file)


def universal_conversion(run: Path) -> Path:
    """Convert the ZeRO-1 checkpoint for ZeRO-2, as a launch with another stage does (and keeps for the next)."""
    from reformer_dist.train.checkpoint import convert_to_universal, plan_resume

    point = plan_resume(run / STEP, world_size=1, zero_stage=2, run_dir=run)
    convert_to_universal(point)
    return point.load_dir / point.tag


PAYLOAD_CASES = [pytest.param(file, cmd, id=f"{file.split('/')[-1]}-{cmd.__name__}")
                 for file in (ARTIFACTS["model-states"][0], ARTIFACTS["optimizer-shard"][0], ARTIFACTS["rng-file"][0])
                 for cmd in (train_cmd, eval_cmd)]
PAYLOAD_CASES += [pytest.param(f"run/universal/step_00000002/{file}", train_cmd, id=f"universal-{file.split('/')[-1]}")
                  for file in ("mp_rank_00_model_states.pt", "zero/optimizer_state.pt", "zero/lm_head.weight/fp32.pt")]


@pytest.mark.parametrize(("file", "cmd"), PAYLOAD_CASES)
def test_pickle_payload_in_a_checkpoint_file_is_refused_and_never_runs(file, cmd, fixture, capsys):
    argv = cmd(fixture)
    if "universal" in file:  # a conversion an earlier launch left; this launch changes the ZeRO stage
        universal_conversion(fixture / "run")
        argv.append("deepspeed.zero_stage=2")
    marker = fixture / "marker"
    plant(fixture / file, marker)
    code, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert f"{fixture / file}: refused: loading it would import exec" in err, err[-3000:]
    assert not marker.exists()


def _zero_to_fp32(checkpoint: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def _ds_to_universal(checkpoint: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = dict(input_folder=str(checkpoint), output_folder=str(checkpoint.parent / "universal"),
                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                inject_missing_state=True)
    ds_to_universal(type("Args", (), args)())


def _engine_load(checkpoint: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    TorchCheckpointEngine().load(str(checkpoint / "mp_rank_00_model_states.pt"), map_location="cpu")


@pytest.mark.parametrize("deepspeed_loader", [_zero_to_fp32, _ds_to_universal, _engine_load])
def test_deepspeed_loaders_run_a_payload_except_inside_weights_only_loads(deepspeed_loader, fixture):
    """DeepSpeed's own readers (consolidation, universal conversion, its default checkpoint engine) pass
    weights_only=False: alone they run the payload; inside ``weights_only_loads`` they refuse it."""
    from reformer_dist.train.weights_only import weights_only_loads

    checkpoint, marker = fixture / "run" / STEP, fixture / "marker"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        plant(checkpoint / name, marker)
    with weights_only_loads(), pytest.raises(Exception, match=r"GLOBAL.*exec"):
        deepspeed_loader(checkpoint)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the payload evaluates to None: DeepSpeed may then fail on the contents
        deepspeed_loader(checkpoint)
    assert marker.exists()  # the control: the payload is live, and these loaders run it


def test_our_checkpoint_engine_refuses_a_payload_naming_the_file(fixture):
    from reformer_dist.errors import CheckpointError
    from reformer_dist.train.weights_only import WeightsOnlyCheckpointEngine

    file, marker = fixture / "run" / STEP / "mp_rank_00_model_states.pt", fixture / "marker"
    assert set(WeightsOnlyCheckpointEngine().load(str(file), map_location="cpu")) >= {"module", "optimizer"}
    plant(file, marker)
    with pytest.raises(CheckpointError, match=f"{file}: refused"):
        WeightsOnlyCheckpointEngine().load(str(file), map_location="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- checksums
def test_verify_checksums_stops_training_before_the_process_group_naming_a_flipped_shard(fixture, capsys):
    shard = fixture / "data" / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the sha256 can tell
    shard.write_bytes(bytes(data))
    (fixture / "run").rename(fixture / "other-run")  # a fresh start, no checkpoint involved
    code, err = run_cli(train_cmd(fixture), capsys)
    assert code == 2, err[-3000:]
    assert f"{shard}: sha256 does not match the manifest" in err

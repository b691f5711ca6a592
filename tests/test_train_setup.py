"""Training setup on one process, no launcher: the generated DeepSpeed config, the batch triple, clear
errors from `reformer-dist train`, the LR schedule, the non-finite-step guard, the FLOP model."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from reformer_dist.cli import main
from reformer_dist.errors import ConfigError
from reformer_dist.model import ReformerConfig, ReformerLM
from reformer_dist.run_config import load_config
from reformer_dist.train.deepspeed_config import build_deepspeed_config
from reformer_dist.train.deepspeed_engine import GuardedAdamW, lr_factor
from reformer_dist.train.distributed import rank_from_env
from reformer_dist.train.flops import peak_flops, token_flops
from reformer_dist.train.preemption import StopRequest


def ds(*overrides: str, world_size: int = 1) -> dict:
    return build_deepspeed_config(load_config(["tiny"], list(overrides)), world_size)


# ------------------------------------------------------------------------------------ DeepSpeed config
def test_batch_triple_is_micro_x_accum_x_world():
    config = ds("train.micro_batch_size=3", "train.grad_accum=4", world_size=8)
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (96, 3, 4)


def test_pinned_global_batch_that_does_not_multiply_out_names_the_key_and_the_fix():
    with pytest.raises(ConfigError) as err:
        ds("train.global_batch_size=64", "train.micro_batch_size=8", "train.grad_accum=1", world_size=2)
    assert err.value.key == "train.global_batch_size"
    assert "train.grad_accum=4" in str(err.value)  # 64 = 8 x 4 x 2
    with pytest.raises(ConfigError, match="multiple of"):
        ds("train.global_batch_size=20", "train.micro_batch_size=8", world_size=2)
    assert ds("train.global_batch_size=32", "train.micro_batch_size=8", "train.grad_accum=2",
              world_size=2)["train_batch_size"] == 32


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_precision_and_offload_map_to_deepspeed_keys(stage):
    config = ds(f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16", "train.grad_clip=0.5")
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["type"] == "AdamW" and config["optimizer"]["params"]["torch_adam"] is True
    if stage:
        offload = ds(f"deepspeed.zero_stage={stage}", "deepspeed.offload_optimizer=true", "deepspeed.overlap_comm=true")
        assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert offload["zero_optimization"]["overlap_comm"] is True
        assert offload["optimizer"]["params"]["torch_adam"] is False  # DeepSpeedCPUAdam for CPU-held states
    fp16 = ds(f"deepspeed.zero_stage={stage}", "deepspeed.precision=fp16")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling


def test_user_json_merges_nested_keys_but_cannot_change_owned_ones(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
                                "wall_clock_breakdown": True}))
    config = ds("deepspeed.zero_stage=3", f"deepspeed.config_file={user}")
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": False, "reduce_bucket_size": 1000}
    assert config["wall_clock_breakdown"] is True
    with pytest.raises(ConfigError) as err:
        ds("deepspeed.zero_stage=2", f"deepspeed.config_file={user}")
    assert err.value.key == "deepspeed.zero_stage"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 99}))
    with pytest.raises(ConfigError) as err:
        ds(f"deepspeed.config_file={user}")
    assert err.value.key == "train.micro_batch_size"
    with pytest.raises(ConfigError, match="no such file"):
        ds(f"deepspeed.config_file={tmp_path / 'missing.json'}")


def test_config_command_prints_the_generated_json(capsys):
    assert main(["config", "--config", "tiny", "--deepspeed", "--world-size", "4", "train.micro_batch_size=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_batch_size"] == 8 and printed["zero_optimization"]["stage"] == 1


# ------------------------------------------------------------------------------------ clear errors
@pytest.mark.parametrize(("overrides", "message"), [
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage: must be 0, 1, 2 or 3"),
    (["train.global_batch_size=3"], "train.global_batch_size: 3 != train.micro_batch_size (4)"),
    (["data.path=/nonexistent/prepared-data"], "/nonexistent/prepared-data"),
])
def test_train_reports_user_errors_in_one_line_before_starting(overrides, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    data = tmp_path / "data"
    from reformer_dist.data import prepare_corpus

    (tmp_path / "corpus.txt").write_text("tiny corpus for a config check. " * 200)
    prepare_corpus([str(tmp_path / "corpus.txt")], str(data), val_fraction=0.1)
    code = main(["train", "--config", "tiny", f"data.path={data}", f"train.output_dir={tmp_path / 'run'}",
                 *overrides])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_launcher_environment_is_read_and_checked():
    assert rank_from_env({}) == (0, 0, 1)
    assert rank_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == (3, 1, 4)
    with pytest.raises(ConfigError):
        rank_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError):
        rank_from_env({"RANK": "0"})


# ------------------------------------------------------------------------------------ schedule, guard, stop
def test_lr_warms_up_linearly_from_the_first_step_then_decays_by_cosine_to_the_floor():
    factors = [lr_factor(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[60] == pytest.approx(0.55)  # cosine midpoint
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1) and lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 100, 0.0) == pytest.approx(1.0)  # no warmup


def test_guarded_adamw_skips_non_finite_steps_and_clips_like_torch():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    ref = torch.nn.Parameter(w.detach().clone())
    opt = GuardedAdamW([w], max_norm=1.0, lr=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.1)

    w.grad = torch.full_like(w, float("nan"))
    before = w.detach().clone()
    opt.step()
    assert opt.overflow and not math.isfinite(opt._global_grad_norm)
    assert torch.equal(w, before) and not opt.state[w]  # untouched: no moment, no step count

    grad = torch.randn(4, 3) * 10
    w.grad, ref.grad = grad.clone(), grad.clone()
    opt.step()
    norm = torch.nn.utils.clip_grad_norm_([ref], 1.0)
    ref_opt.step()
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(float(norm))
    torch.testing.assert_close(w, ref)


def test_stop_request_is_set_by_sigusr1_and_by_the_time_budget():
    stop = StopRequest(time_limit_minutes=None)
    try:
        assert not stop.signalled and not stop.out_of_time
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signalled and stop.signal_name == "SIGUSR1"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    stop = StopRequest(time_limit_minutes=1e-9)
    stop.restore()
    assert stop.out_of_time and not stop.signalled


# ------------------------------------------------------------------------------------ FLOPs
def micro_config(kinds: list[str], **kw) -> ReformerConfig:
    base = dict(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=2, attn_layers=kinds,
                lsh_chunk_len=16, local_chunk_len=16, max_seq_len=256, axial_pos_shape=[16, 16],
                axial_pos_dims=[16, 16])
    return ReformerConfig(**{**base, **kw})


def test_flop_model_matches_a_flop_counter_on_local_attention():
    cfg = micro_config(["local"])
    torch.manual_seed(0)
    model = ReformerLM(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 256, (2, 64)))
    assert token_flops(cfg, 64).forward == counter.get_total_flops() / (2 * 64)


def test_lsh_flops_per_token_follow_the_window_not_the_sequence_length():
    cfg = micro_config(["lsh"], lsh_n_buckets=8)
    short, long = token_flops(cfg, 64), token_flops(cfg, 256)
    assert short == long  # per token: independent of the sequence length
    wider = token_flops(micro_config(["lsh"], lsh_n_buckets=8, lsh_chunk_len=32), 256)
    # scores + values: n_heads * d_head * 4 FLOPs per key, 2 chunks of keys per hash round, 2 layers
    assert wider.layers - long.layers == pytest.approx(2 * 2 * 4 * 32 * 2 * 16)
    assert long.hardware_per_token == long.model_per_token + long.forward - long.hashing  # recompute counted
    assert token_flops(micro_config(["full"]), 256).layers > token_flops(micro_config(["full"]), 64).layers


def test_peak_flops_lookup():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16", None) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16", None) == 756e12
    assert peak_flops(None, "fp32", None) is None  # CPU: MFU not reported
    assert peak_flops(None, "fp32", 2.5) == 2.5e12

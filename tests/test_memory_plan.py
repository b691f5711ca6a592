"""The memory planner (`reformer-dist plan`): its parameter count is the model's, its terms follow ZeRO and
sequence parallelism, the longest length it reports is the last one whose plan fits, bad input is one line.
(Predictions against measured peaks: benchmarks/bench_memory_plan.py.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from reformer_dist.model import ReformerLM
from reformer_dist.run_config import load_config
from reformer_dist.train.memory_plan import count_parameters, longest_seq_len, plan_memory, with_seq_len


@pytest.mark.parametrize("overrides", [[], ["model.attn_layers=[lsh,full]", "model.n_layers=4", "model.d_ff=96"]])
def test_parameter_count_is_the_models(overrides):
    model = load_config(["tiny"], overrides).model
    assert count_parameters(model) == sum(p.numel() for p in ReformerLM(model).parameters())


def test_zero_stages_partition_states_and_sequence_parallelism_divides_activations():
    long = ["train.seq_len=65536", "model.max_seq_len=65536", "model.axial_pos_shape=[256,256]",
            "train.micro_batch_size=1"]
    plans = {stage: plan_memory(load_config(["tiny"], [*long, f"deepspeed.zero_stage={stage}"]), 8)
             for stage in (0, 1, 2, 3)}
    states = {stage: sum(p.states.values()) for stage, p in plans.items()}
    # (ZeRO-2's gradient partition comes with a reduce bucket: for a model this small it holds every gradient)
    assert states[0] > states[1] > states[3] and states[2] < states[0]
    # 8 heads: a rank of a pair attends over half of each head group (whole sequence), and holds half of
    # every stream
    heads = [*long, "model.n_heads=8", "model.d_head=16"]
    one = plan_memory(load_config(["tiny"], heads), 2)
    two = plan_memory(load_config(["tiny"], [*heads, "deepspeed.sequence_parallel_size=2"]), 2)
    act_one, act_two = max(one.activations.values()), max(two.activations.values())
    assert 0.45 * act_one < act_two < 0.6 * act_one


def test_on_cpu_the_pooled_attention_buffers_count_beside_the_feed_forward_backward():
    # one head of 2**20 positions x 64 fp32 features: 256 MiB tensors, far above the pool's threshold
    long = ["train.seq_len=1048576", "model.max_seq_len=1048576", "model.axial_pos_shape=[1024,1024]",
            "train.micro_batch_size=1", "model.n_heads=4", "model.d_head=64", "model.ff_chunk_size=4096",
            "model.attn_layers=[lsh]", "model.lsh_n_hashes=2"]
    cfg = load_config(["tiny"], long)
    key = "backward: feed-forward chunk"
    g = 2**20 * 64 * 4
    # qk and v (projected in tiles), the output, its gradient and the fp32 gradients of qk and v
    assert plan_memory(cfg, 1, "cpu").activations[key] - plan_memory(cfg, 1, "cuda").activations[key] == 6 * g
    # under sequence parallelism the exchange frees the projections (a rank still attends over one whole head)
    sp = load_config(["tiny"], [*long, "deepspeed.sequence_parallel_size=2"])
    assert plan_memory(sp, 2, "cpu").activations[key] - plan_memory(sp, 2, "cuda").activations[key] == 4 * g


def test_longest_length_is_the_last_multiple_whose_plan_fits():
    cfg = load_config(["tiny"], ["train.micro_batch_size=1", "deepspeed.sequence_parallel_size=2"])
    best = longest_seq_len(cfg, 2, 1.0)
    step = 32  # lengths are multiples of the chunk length (32) and of P (2)
    assert best % step == 0
    assert plan_memory(with_seq_len(cfg, best), 2).peak_bytes <= 2**30
    assert plan_memory(with_seq_len(cfg, best + step), 2).peak_bytes > 2**30


def test_plan_command_prints_the_terms_and_refuses_bad_input_in_one_line():
    cmd = [sys.executable, "-m", "reformer_dist", "plan", "--config", "tiny", "--world-size", "2",
           "deepspeed.sequence_parallel_size=2", "--memory-gib", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "peak per rank" in out.stdout and "longest train.seq_len within 4 GiB per rank:" in out.stdout
    bad = subprocess.run([*cmd[:-2], "--memory-gib", "-1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--memory-gib" in bad.stderr

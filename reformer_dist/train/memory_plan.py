"""Predicted peak memory per rank of one training step, and the longest sequence that fits (``reformer-dist plan``).

Everything is counted in bytes per rank. With W ranks, P ranks per sequence (sequence parallelism) and
micro-batch B, a rank holds l = seq_len / P positions of each sequence:

- **Model states** (DeepSpeed's layout by ZeRO stage, partitioned over all W ranks): 16-bit or fp32
  parameters, their gradients, AdamW's two fp32 moments and, in bf16/fp16, the fp32 master copy. ZeRO-1/2
  keep the fp32 master partition even in fp32 training (DeepSpeed flattens and copies it); ZeRO-2/3 hold
  one reduce bucket of full gradients while reducing; ZeRO-3 also gathers one layer's parameters.
- **Activations** of the reversible stack, whose backward works in place and in tiles
  (``reformer_dist/model/reversible.py``): no layer allocates a stream-sized tensor, only a position tile's
  and a head group's. In units of one stream, u = B * l * d_model * s (s = bytes per activation: 4 in
  fp32, 2 under DeepSpeed's bf16/fp16, which casts the module), the largest moments are: the forward (the
  input and the two streams 3u + a head group), a head group's attention backward (the two streams and
  their gradients 4u + the group), the loss head (4u: its chunks write the streams' gradients in place,
  ``ChunkedLossSum``) and a feed-forward tile's backward (4u + the tile, and on CPU the large attention
  buffers the backward's pool keeps for the next layer). A head group's tensors cover the whole sequence
  for its heads (``reversible.head_groups`` sizes them; under sequence parallelism each rank holds count/P
  heads): LSH keeps qk, v, the output and per-round outputs (n_hashes) in the forward, and qk, v, the
  output, its gradient and fp32 gradients of qk and v in the backward, plus the sort's int64 index arrays;
  local attention its (chunk x window) score tensors. The all-to-alls of sequence parallelism copy a
  group's tensors once more. LSH buckets (int32) are kept for every LSH layer through the step. On CPU the
  large ones among these tensors come from a pool that lives for one pass (``model/buffer_pool.py``), and
  what glibc's heap keeps of freed smaller ones goes back to the kernel before each head group's attention
  and after each micro-batch's step (``buffer_pool.return_free_heap``): the counts are of live tensors, and the
  process's peak RSS holds whatever heap holes the peak's own allocations leave on top of them.
- **Process**: on CPU the resident memory of a training process with a model of no size (torch,
  DeepSpeed, the communication op, Python): ``PROCESS_BYTES_CPU``, measured; on GPU the count is of
  tensors, as ``torch.cuda.max_memory_allocated`` reports it (the CUDA context comes on top).

``benchmarks/bench_memory_plan.py`` compares these predictions with the peaks training runs measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from reformer_dist.errors import ConfigError
from reformer_dist.model import ReformerConfig
from reformer_dist.model.buffer_pool import POOLED_BYTES
from reformer_dist.model.lsh.layout import BLOCK_SCORES
from reformer_dist.model.reversible import head_groups
from reformer_dist.run_config import JobConfig

GIB = 2**30
# Peak RSS of `reformer-dist train` (one rank, 2 threads) with a model of ~40K parameters on 64 tokens:
# the runtime alone (measured on the CI-class machine; benchmarks/bench_memory_plan.py prints it again).
PROCESS_BYTES_CPU = int(0.45 * GIB)
# DeepSpeed's default ZeRO reduce bucket (elements) and ZeRO-3 prefetch/live parameter bound.
REDUCE_BUCKET_ELEMENTS = 500_000_000


@dataclass
class MemoryPlan:
    """A prediction for one rank: named terms (bytes) and the moment of the step that peaks."""

    seq_len: int
    world_size: int
    sequence_parallel_size: int
    states: dict[str, int] = field(default_factory=dict)
    """Model states: parameters, gradients, optimizer states."""
    activations: dict[str, int] = field(default_factory=dict)
    """Per moment of the step (the largest counts)."""
    fixed: dict[str, int] = field(default_factory=dict)
    """Held through the step: LSH buckets, the process itself."""

    @property
    def peak_moment(self) -> str:
        return max(self.activations, key=self.activations.get)

    @property
    def peak_bytes(self) -> int:
        return sum(self.states.values()) + max(self.activations.values()) + sum(self.fixed.values())

    def table(self) -> str:
        rows = [f"  {k:<34} {v / GIB:9.3f} GiB" for k, v in self.states.items()]
        rows += [f"  {k:<34} {v / GIB:9.3f} GiB" for k, v in self.fixed.items()]
        rows.append(f"  activations at the peak moment:    {self.activations[self.peak_moment] / GIB:9.3f} GiB "
                    f"({self.peak_moment})")
        rows += [f"    {k:<32} {v / GIB:9.3f} GiB" for k, v in self.activations.items() if k != self.peak_moment]
        rows.append(f"  {'peak per rank':<34} {self.peak_bytes / GIB:9.3f} GiB")
        return "\n".join(rows)


def layer_parameters(model: ReformerConfig, kind: str) -> int:
    """Parameters of one layer: attention (LayerNorm, projections, output) and feed-forward."""
    d, inner = model.d_model, model.n_heads * model.d_head
    projections = 2 if kind == "lsh" else 3
    return 2 * d + projections * d * inner + inner * d + 2 * d + d * model.d_ff + model.d_ff + model.d_ff * d + d


def count_parameters(model: ReformerConfig) -> int:
    """Parameters of ``ReformerLM(model)``: embeddings, axial positions, the layers, final norm, LM head."""
    d = model.d_model
    axial = sum(n * k for n, k in zip(model.resolved_axial_shape(), model.resolved_axial_dims()))
    outside = model.vocab_size * d + axial + 2 * (2 * d) + (2 * d + 1) * model.vocab_size
    return outside + sum(layer_parameters(model, kind) for kind in model.layer_kinds())


def model_states(cfg: JobConfig, world_size: int, n_params: int, layer_params: int) -> dict[str, int]:
    """Parameters, gradients and AdamW states per rank for the run's ZeRO stage and precision."""
    ds, n, w = cfg.deepspeed, n_params, world_size
    half = ds.precision in ("bf16", "fp16")
    p_bytes = 2 if half else 4
    stage = ds.zero_stage
    out: dict[str, int] = {}
    if stage == 3:
        out["parameters (ZeRO-3 partition)"] = math.ceil(n / w) * p_bytes
        out["parameters gathered (one layer)"] = 2 * layer_params * p_bytes  # current + prefetched
    else:
        out["parameters"] = n * p_bytes
    bucket = min(n, REDUCE_BUCKET_ELEMENTS)
    if stage >= 2:
        out["gradients (partition + reduce bucket)"] = (math.ceil(n / w) + bucket) * p_bytes
    else:
        out["gradients"] = n * p_bytes
    shard = n if stage == 0 else math.ceil(n / w)
    master = 4 * shard if (half or stage in (1, 2)) else 0  # fp32 master copy (ZeRO-1/2 flatten and copy it)
    where = " (offloaded to host)" if ds.offload_optimizer else ""
    out[f"optimizer states: AdamW moments{where}"] = 8 * shard
    if master:
        out[f"optimizer states: fp32 master{where}"] = master
    return out


def _attention_group(model: ReformerConfig, kind: str, batch: int, seq_len: int, local_heads: int, s: int,
                     sequence_parallel: bool) -> tuple[int, int]:
    """Bytes of one head group's attention tensors (whole sequence, this rank's heads): (forward,
    backward) working sets on top of the layer's stream-sized tensors."""
    g = batch * seq_len * local_heads * model.d_head * s  # one (B, L, heads, D) tensor
    rows = batch * seq_len * local_heads
    exchange = 2 * g if sequence_parallel else 0  # the all-to-all's input copy and output buffer
    if kind == "lsh":
        n = model.lsh_n_hashes
        index = 6 * 8 * rows * n  # the sort's int64 arrays (keys, order, positions, rows, destinations)
        stats = 2 * 4 * rows * n
        blocks = 8 * 4 * BLOCK_SCORES  # a block's score temporaries
        forward = 2 * g + n * g + g + index + stats + blocks + exchange
        # qk, v, the output, the output's gradient, fp32 gradients of qk and v
        backward = 4 * g + 2 * batch * seq_len * local_heads * model.d_head * 4 + index + stats + blocks + exchange
        return forward, backward
    window = seq_len if kind == "full" else (1 + model.local_chunks_before + model.local_chunks_after) * \
        min(model.local_chunk_len, seq_len)
    scores = 4 * rows * window  # one fp32 (B, heads, L, window) tensor
    keys = (window // min(model.local_chunk_len, seq_len) if kind == "local" else 1) * g
    forward = 3 * g + 2 * keys + 3 * scores + g + exchange
    backward = 3 * g + 2 * keys + 4 * scores + 4 * g + exchange
    return forward, backward


def _pooled_attention(model: ReformerConfig, kind: str, batch: int, seq_len: int, local_heads: int, s: int,
                      tiled: bool, sequence_parallel: bool) -> int:
    """CPU: bytes the backward's buffer pool (``model/buffer_pool.py``) keeps from a head group's attention
    through the rest of the pass, the feed-forward tiles' backward included: the most its tensors of at
    least ``POOLED_BYTES`` occupy at once. Pooled are the input projections when built from position
    tiles (not under sequence parallelism: the exchange frees them), the attention output's gradient, and
    LSH's per-round outputs (the first becomes the output) and fp32 gradients of qk and v."""
    g = batch * seq_len * local_heads * model.d_head * s  # one (B, L, heads, D) tensor

    def pooled_bytes(nbytes: int) -> int:  # a tensor of nbytes, if it is large enough to be pooled
        return nbytes if nbytes >= POOLED_BYTES else 0

    projections = 0 if sequence_parallel or not tiled else (2 if kind == "lsh" else 3) * pooled_bytes(g)
    if kind != "lsh":
        return projections + pooled_bytes(g)
    recompute = projections + model.lsh_n_hashes * pooled_bytes(g)
    # the output, its gradient, fp32 gradients of qk and v
    backward = projections + 2 * pooled_bytes(g) + 2 * pooled_bytes(g * 4 // s)
    return max(recompute, backward)


def activations(cfg: JobConfig, s: int, pooled: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(moments, held-through-the-step) activation bytes per rank; ``pooled``: large buffers come from
    the reversible passes' pools (CPU)."""
    model, train = cfg.model, cfg.train
    p = cfg.deepspeed.sequence_parallel_size
    batch, seq_len, d = train.micro_batch_size, train.seq_len, model.d_model
    u = batch * (seq_len // p) * d * s
    kinds = model.layer_kinds()
    groups = head_groups(model.n_heads, batch * seq_len * model.d_head, p)
    local_heads = groups[0][1] // p
    attention = {k: _attention_group(model, k, batch, seq_len, local_heads, s, p > 1) for k in set(kinds)}
    ff_chunk = min(model.ff_chunk_size or seq_len // p, seq_len // p)
    ff = 6 * batch * ff_chunk * model.d_ff * 4  # a chunk's hidden activations, their gradients (fp32 bound)
    loss_chunk = 3 * batch * min(model.loss_chunk_size, seq_len // p) * model.vocab_size * 4
    moments = {
        "forward": max(3 * u + attention[k][0] for k in attention),
        "loss head": 4 * u + loss_chunk,
        "backward: head-group attention": max(4 * u + attention[k][1] for k in attention),
        "backward: feed-forward chunk": 4 * u + ff,
    }
    if pooled:
        tiled = ff_chunk < seq_len // p
        moments["backward: feed-forward chunk"] += max(
            _pooled_attention(model, k, batch, seq_len, local_heads, s, tiled, p > 1) for k in set(kinds))
    lsh_layers = kinds.count("lsh")
    held = {"LSH buckets (int32, every LSH layer)":
            lsh_layers * batch * (model.n_heads // p) * model.lsh_n_hashes * seq_len * 4} if lsh_layers else {}
    return moments, held


def plan_memory(cfg: JobConfig, world_size: int, device: str = "cpu") -> MemoryPlan:
    """The memory plan of ``cfg`` on ``world_size`` ranks (device 'cpu' adds the process's own memory)."""
    from reformer_dist.train.sequence_parallel import layout_for

    layout_for(world_size, cfg.deepspeed.sequence_parallel_size)  # the layout must exist
    n_params = count_parameters(cfg.model)
    per_layer = max(layer_parameters(cfg.model, kind) for kind in set(cfg.model.layer_kinds()))
    s = 2 if cfg.deepspeed.precision in ("bf16", "fp16") else 4
    moments, held = activations(cfg, s, pooled=device == "cpu")
    plan = MemoryPlan(cfg.train.seq_len, world_size, cfg.deepspeed.sequence_parallel_size)
    plan.states = model_states(cfg, world_size, n_params, per_layer)
    plan.activations = moments
    plan.fixed = dict(held)
    if device == "cpu":
        plan.fixed["process (torch, DeepSpeed, Python)"] = PROCESS_BYTES_CPU
    return plan


def with_seq_len(cfg: JobConfig, seq_len: int) -> JobConfig:
    """``cfg`` at another training length (the positional table grows with it when needed)."""
    model = cfg.model
    if seq_len > model.max_seq_len:
        first = 2 ** math.ceil(math.log2(seq_len) / 2)
        model = replace(model, max_seq_len=seq_len, axial_pos_shape=[first, math.ceil(seq_len / first)])
    return replace(cfg, model=model, train=replace(cfg.train, seq_len=seq_len))


def longest_seq_len(cfg: JobConfig, world_size: int, memory_gib: float, device: str = "cpu") -> int | None:
    """The longest train.seq_len (a multiple of the chunk length and of P) whose predicted peak fits
    ``memory_gib`` per rank; None if not even one multiple fits."""
    step = math.lcm(cfg.model.pad_multiple(), cfg.deepspeed.sequence_parallel_size)
    budget = memory_gib * GIB

    def fits(k: int) -> bool:
        return plan_memory(with_seq_len(cfg, k * step), world_size, device).peak_bytes <= budget

    if not fits(1):
        return None
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi * step > 2**40:
            raise ConfigError("--memory-gib", f"{memory_gib} GiB fits sequences beyond 2**40 positions")
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step

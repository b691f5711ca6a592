"""The ``train:``, ``deepspeed:`` and ``logging:`` sections of a run config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from reformer_dist.errors import ConfigError


@dataclass
class TrainConfig:
    output_dir: str = "runs/tiny"
    """Run directory: config.yaml, ds_config.json, metrics.jsonl, checkpoints and the `latest` pointer."""
    max_steps: int = 200
    """Optimizer steps to train for."""
    seq_len: int = 256
    """Tokens per training sample (the model pads to its chunk multiple internally)."""
    micro_batch_size: int = 4
    """Samples per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all ranks; null = micro_batch_size*grad_accum*world_size.
    If set, it must equal that product (checked at launch, when the world size is known)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (0 = off)."""
    seed: int = 1234
    """Seed of model init, data order and every random stream."""
    eval_every: int = 50
    """Evaluate every N steps (0 = only at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    sample_every: int = 0
    """Every N steps (and at the last step) rank 0 continues ``sample_prompt`` with the decoding runtime
    (``reformer_dist.decoding.generate``: cached, top-k 40, temperature 0.8, seeded by ``seed``), prints
    the prompt and the continuation, appends them to metrics.jsonl and logs them to W&B's ``samples`` text
    table; 0 = never (sampling pauses training, and under ZeRO-3 gathers the whole model on rank 0: keep it
    off for large runs)."""
    sample_prompt: str = "\n"
    """Text the samples continue (printed with them)."""
    sample_tokens: int = 200
    """Tokens generated per sample."""
    save_every: int = 100
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 3
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    resume: str = "auto"
    """'auto': continue from the latest good checkpoint if any; 'never'; or a checkpoint path."""
    log_every: int = 10
    """Print a readout line every N steps."""
    time_limit_minutes: float | None = None
    """Wall-time budget of this launch: checkpoint and exit 0 once it is spent (set it a few minutes
    below a cluster job's limit); null = none."""
    max_nonfinite_steps: int = 20
    """Stop after this many consecutive skipped steps (non-finite loss or gradients, fp16 overflow);
    the last good checkpoint stays the resume point."""

    def validate(self) -> TrainConfig:
        for name in ("max_steps", "seq_len", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "sample_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.sample_tokens < 1:
            raise ConfigError("train.sample_tokens", f"must be >= 1, got {self.sample_tokens}")
        if self.sample_every and not self.sample_prompt:
            raise ConfigError("train.sample_prompt", "must not be empty when train.sample_every is set")
        if self.keep_last < 1:
            raise ConfigError("train.keep_last", f"must be >= 1, got {self.keep_last}")
        if not self.lr > 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ConfigError("train.global_batch_size", f"must be >= 1 or null, got {self.global_batch_size}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.log_every < 1:
            raise ConfigError("train.log_every", f"must be >= 1, got {self.log_every}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError("train.max_nonfinite_steps", f"must be >= 1, got {self.max_nonfinite_steps}")
        if self.time_limit_minutes is not None and not self.time_limit_minutes > 0:
            raise ConfigError("train.time_limit_minutes", f"must be > 0 or null, got {self.time_limit_minutes}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("train.betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        return self


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage: 0 (plain data parallel), 1 (optimizer states), 2 (+gradients), 3 (+parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO >= 1)."""
    offload_params: bool = False
    """Keep parameters on CPU (ZeRO-3 only)."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (dynamic loss scaling)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (ZeRO >= 1)."""
    config_file: str | None = None
    """A user's own DeepSpeed JSON, merged over the generated one (nested keys are merged, the user's
    values win). The batch triple is not settable there: use train.micro_batch_size/grad_accum."""
    collective_timeout_s: float = 100.0
    """Seconds a collective may wait for a peer before this rank fails: a dead or hung rank then ends
    the job instead of stalling it. Raise it if one checkpoint write takes longer."""
    sequence_parallel_size: int = 1
    """Ranks that share each sample (DeepSpeed-Ulysses sequence parallelism): each holds seq_len/P positions,
    and attention exchanges them for n_heads/P heads over the whole sequence. Groups are consecutive ranks;
    the world size must be a multiple of it (data parallel across groups, ZeRO over all ranks)."""

    def validate(self) -> DeepSpeedConfig:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError("deepspeed.precision", f"must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params", "needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 1")
        if self.sequence_parallel_size < 1:
            raise ConfigError("deepspeed.sequence_parallel_size", f"must be >= 1, got {self.sequence_parallel_size}")
        if not self.collective_timeout_s > 0:
            raise ConfigError("deepspeed.collective_timeout_s", f"must be > 0, got {self.collective_timeout_s}")
        return self


# W&B's own spellings of WANDB_MODE -> ours ("dryrun" and "run" are its older names)
WANDB_ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "dryrun": "offline",
                   "run": "online"}


@dataclass
class WandbConfig:
    mode: str | None = None
    """online, offline or disabled; null = $WANDB_MODE if set, else disabled."""
    project: str | None = None
    """W&B project; null = $WANDB_PROJECT if set, else reformer-dist."""
    entity: str | None = None
    """W&B entity (team or user); null = $WANDB_ENTITY if set, else your W&B default."""
    group: str | None = None
    """W&B run group."""
    tags: list[str] = field(default_factory=list)
    """W&B run tags."""

    def validate(self) -> WandbConfig:
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ConfigError("logging.wandb.mode", f"must be online, offline or disabled, got {self.mode!r}")
        return self

    def resolve(self, env: Mapping[str, str]) -> WandbConfig:
        """This config with each unset key taken from W&B's environment variables (as ``wandb`` itself
        does), then from the defaults; a key the config sets wins over the environment."""
        mode = self.mode
        if mode is None:
            raw = env.get("WANDB_MODE", "").strip().lower()
            if raw and raw not in WANDB_ENV_MODES:
                raise ConfigError("WANDB_MODE", f"must be online, offline or disabled, got {raw!r} (it applies "
                                                f"because logging.wandb.mode is not set)")
            mode = WANDB_ENV_MODES.get(raw, "disabled")
        return replace(self, mode=mode, project=self.project or env.get("WANDB_PROJECT") or "reformer-dist",
                       entity=self.entity or env.get("WANDB_ENTITY") or None)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases tracking."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one accelerator at the training precision, for MFU/HFU; null = looked up
    for known GPUs (A100, H100, H200, ...), not reported where unknown (CPU)."""
    progress_bar: bool = True
    """Show a progress bar with ETA on rank 0 when stdout is a terminal (logs always get readout lines)."""

    def validate(self) -> LoggingConfig:
        self.wandb.validate()
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError("logging.peak_tflops", f"must be > 0 or null, got {self.peak_tflops}")
        return self

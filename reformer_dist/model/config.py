"""The Reformer model's hyper-parameters.

The YAML ``model:`` section of a run config uses exactly these field names. Validation lives in
:meth:`ReformerConfig.validate`, which raises :class:`~reformer_dist.errors.ConfigError` naming the
field (prefixed ``model.``) so a bad YAML value is reported where the user wrote it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reformer_dist.errors import ConfigError
from reformer_dist.model.lsh.spec import WINDOWS, LshSpec

ATTENTION_KINDS = ("lsh", "local", "full")

# activation name -> (torch.nn.functional function, its keyword arguments); the feed-forward applies it
ACTIVATIONS: dict[str, tuple[str, dict[str, str]]] = {
    "relu": ("relu", {}),
    "gelu": ("gelu", {}),
    "gelu_new": ("gelu", {"approximate": "tanh"}),
    "silu": ("silu", {}),
}


@dataclass
class ReformerConfig:
    vocab_size: int = 256
    """Number of token ids (256 for raw bytes, 258 for HF's enwik8 bytes+2)."""
    d_model: int = 256
    """Width of each of the two reversible residual streams (the LM head reads 2*d_model)."""
    n_heads: int = 4
    """Attention heads per layer."""
    d_head: int = 64
    """Width of one attention head (n_heads*d_head need not equal d_model)."""
    d_ff: int = 1024
    """Hidden width of the feed-forward block."""
    n_layers: int = 6
    """Number of (attention, feed-forward) layer pairs."""
    attn_layers: list[str] = field(default_factory=lambda: ["local", "lsh"])
    """Attention kind per layer: 'lsh', 'local' or 'full'. A shorter list is a pattern repeated to n_layers."""
    lsh_window: str = "bucket"
    """'bucket': strictly causal, each query sees the last lsh_chunk_len earlier tokens of its own bucket.
    'chunk': the reference (HF/trax) fixed chunks over the sorted order; needed for checkpoint parity,
    but later tokens move chunk boundaries, so outputs depend slightly on the future."""
    lsh_chunk_len: int = 64
    """Chunk length over the sorted order ('chunk') or window length per bucket ('bucket')."""
    lsh_n_hashes: int = 2
    """Hash rounds; their outputs are combined with logsumexp weights."""
    lsh_n_buckets: Any = None  # int | list[int] | None: OmegaConf cannot type a union with a list
    """Buckets per round: an even int, a list of even factors (factorised buckets), or null = automatic
    (a power of two close to 2*max_seq_len/lsh_chunk_len, factorised above 128, as HF does)."""
    lsh_chunks_before: int = 1
    """'chunk' window: chunks of look-back over the sorted order."""
    lsh_chunks_after: int = 0
    """'chunk' window: chunks of look-ahead over the sorted order (must be 0 for causal models)."""
    local_chunk_len: int = 64
    """Chunk length of local attention."""
    local_chunks_before: int = 1
    """Chunks of look-back of local attention."""
    local_chunks_after: int = 0
    """Chunks of look-ahead of local attention (must be 0 for causal models)."""
    causal: bool = True
    """Decoder (causal) model; false gives a bidirectional encoder."""
    reversible: bool = True
    """Reversible residual layers (activations recomputed in backward). false: a plain residual stack
    with the same parameters, for debugging and gradient checks."""
    dropout: float = 0.0
    """Dropout on the residual branches, the embeddings and inside the feed-forward block."""
    attn_dropout: float = 0.0
    """Dropout on LSH attention probabilities."""
    local_attn_dropout: float | None = None
    """Dropout on local/full attention probabilities; null = attn_dropout."""
    max_seq_len: int = 4096
    """Longest sequence the model serves (positional table size); any shorter length works."""
    axial_pos_shape: list[int] | None = None
    """Axial positional embedding factors; their product must be >= max_seq_len.
    null = automatic (two factors close to sqrt(max_seq_len))."""
    axial_pos_dims: list[int] | None = None
    """Feature width per axial factor, summing to d_model. null = automatic (d_model split evenly)."""
    axial_norm_std: float | None = None
    """Init std of the axial positional weights; null = init_std, the token embeddings' std. HF's
    default, 1.0 beside token embeddings at 0.02, drowns the tokens in the positions at initialisation:
    a fresh model then sits at the unigram level for ~100 steps (README, learning curves). Only fresh
    models are affected: a checkpoint loads its own weights."""
    ff_chunk_size: int = 2048
    """Positions per tile of the position-wise work (0 = one tile): the feed-forward, and in the reversible
    stack also the attention's LayerNorm, input and output projections, run one tile at a time, so their
    (batch, tile, d_ff) activations and temporaries exist for one tile only; shorter sequences run in one."""
    loss_chunk_size: int = 4096
    """Positions per chunk of the LM-head + cross-entropy so (seq, vocab) logits never exist whole."""
    hash_seed: int | None = None
    """If set, every LSH layer draws the same rotations on every call (HF-compatible on CPU);
    null = fresh rotations per call from each layer's private generator."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (HF's Reformer uses 1e-12)."""
    activation: str = "relu"
    """Feed-forward activation: relu, gelu, gelu_new or silu."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights (HF's and GPT-2's 0.02, for widths
    near 1,000; at small widths ~1/sqrt(d_model) learns faster: configs/tiny.yaml, README learning
    curves). The output projections of the attention and feed-forward branches, which write into the
    residual streams, get init_std / sqrt(2 * n_layers), as in GPT-2."""
    pad_token_id: int | None = None
    """Token id treated as padding in generation/serving batches (HF enwik8: 0); null = none."""

    # ------------------------------------------------------------------ derived values
    def layer_kinds(self) -> list[str]:
        """The attention kind of each of the n_layers layers (the pattern repeated)."""
        reps = self.n_layers // max(1, len(self.attn_layers))
        return list(self.attn_layers) * reps

    def lsh_spec(self) -> LshSpec:
        """The hashing and window of this model's LSH layers, as the op, the kernels and export take them."""
        return LshSpec(n_hashes=self.lsh_n_hashes, n_buckets=tuple(self.lsh_bucket_factors()),
                       chunk_len=self.lsh_chunk_len, chunks_before=self.lsh_chunks_before,
                       chunks_after=self.lsh_chunks_after, window=self.lsh_window, causal=self.causal)

    def lsh_bucket_factors(self) -> list[int]:
        """Buckets per hash round as a list of factors (one entry unless factorised)."""
        nb = self.lsh_n_buckets
        if nb is None:
            target = max(2, 2 * self.max_seq_len // self.lsh_chunk_len)
            nb = 2 ** max(1, int(math.log2(target)))
            if nb > 128:  # HF factorises large bucket counts to keep rotations small
                first = 2 ** (int(math.log2(nb)) // 2 + int(math.log2(nb)) % 2)
                return [first, nb // first]
            return [nb]
        if isinstance(nb, int):
            return [nb]
        return [int(f) for f in nb]

    def lsh_n_buckets_total(self) -> int:
        """Total buckets per round (the product of the factors)."""
        return math.prod(self.lsh_bucket_factors())

    def resolved_axial_norm_std(self) -> float:
        return self.init_std if self.axial_norm_std is None else float(self.axial_norm_std)

    def resolved_axial_shape(self) -> list[int]:
        if self.axial_pos_shape is not None:
            return [int(s) for s in self.axial_pos_shape]
        first = 2 ** math.ceil(math.log2(max(1, self.max_seq_len)) / 2)
        return [first, math.ceil(self.max_seq_len / first)]

    def resolved_axial_dims(self) -> list[int]:
        if self.axial_pos_dims is not None:
            return [int(d) for d in self.axial_pos_dims]
        n = len(self.resolved_axial_shape())
        dims = [self.d_model // n] * n
        dims[-1] += self.d_model - sum(dims)
        return dims

    def pad_multiple(self) -> int:
        """Sequence lengths are right-padded to a multiple of this inside the model."""
        kinds = set(self.layer_kinds())
        m = 1
        if "lsh" in kinds:
            m = math.lcm(m, self.lsh_chunk_len)
        if "local" in kinds:
            m = math.lcm(m, self.local_chunk_len)
        return m

    # ------------------------------------------------------------------ validation
    def validate(self, prefix: str = "model") -> ReformerConfig:
        """Check every field; raise ConfigError naming the first bad one. Returns self."""

        def bad(name: str, reason: str) -> ConfigError:
            return ConfigError(f"{prefix}.{name}", reason)

        for name in ("vocab_size", "d_model", "n_heads", "d_head", "d_ff", "n_layers", "lsh_chunk_len",
                     "lsh_n_hashes", "local_chunk_len", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("lsh_chunks_before", "lsh_chunks_after", "local_chunks_before", "local_chunks_after",
                     "ff_chunk_size"):
            if int(getattr(self, name)) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.init_std > 0:
            raise bad("init_std", f"must be > 0, got {self.init_std}")
        if self.axial_norm_std is not None and not self.axial_norm_std > 0:
            raise bad("axial_norm_std", f"must be > 0 or null, got {self.axial_norm_std}")
        if self.loss_chunk_size < 1:
            raise bad("loss_chunk_size", f"must be >= 1, got {self.loss_chunk_size}")
        for name in ("dropout", "attn_dropout", "local_attn_dropout"):
            p = getattr(self, name)
            if p is not None and not 0.0 <= float(p) < 1.0:
                raise bad(name, f"must be in [0, 1), got {p}")
        if not self.attn_layers:
            raise bad("attn_layers", "must list at least one attention kind")
        for kind in self.attn_layers:
            if kind not in ATTENTION_KINDS:
                raise bad("attn_layers", f"unknown attention kind {kind!r}; choose from {list(ATTENTION_KINDS)}")
        if self.n_layers % len(self.attn_layers):
            raise bad("attn_layers", f"has {len(self.attn_layers)} entries, which do not repeat evenly "
                                     f"into n_layers={self.n_layers}")
        if self.lsh_window not in WINDOWS:
            raise bad("lsh_window", f"must be one of {list(WINDOWS)}, got {self.lsh_window!r}")
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        nb = self.lsh_n_buckets
        if nb is not None:
            factors = [nb] if isinstance(nb, int) else list(nb)
            if not factors or any((not isinstance(f, int)) or f < 2 or f % 2 for f in factors):
                raise bad("lsh_n_buckets", f"must be an even int >= 2, a list of them, or null; got {nb!r}")
        if self.causal and (self.lsh_chunks_after or self.local_chunks_after):
            key = "lsh_chunks_after" if self.lsh_chunks_after else "local_chunks_after"
            raise bad(key, "must be 0 for a causal model (look-ahead would see the future)")
        shape, dims = self.resolved_axial_shape(), self.resolved_axial_dims()
        if len(shape) != len(dims):
            raise bad("axial_pos_dims", f"has {len(dims)} entries but axial_pos_shape has {len(shape)}")
        if sum(dims) != self.d_model:
            raise bad("axial_pos_dims", f"must sum to d_model={self.d_model}, got {sum(dims)}")
        if math.prod(shape) < self.max_seq_len:
            raise bad("axial_pos_shape", f"product {math.prod(shape)} is smaller than max_seq_len={self.max_seq_len}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise bad("pad_token_id", f"must be in [0, vocab_size={self.vocab_size})")
        return self

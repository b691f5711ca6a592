"""The ``reformer::LshAttention`` ONNX node and its standard-op FunctionProto body.

Export maps ``torch.ops.reformer.lsh_attention`` to ONE bare node (see :func:`translate_lsh_attention`);
:func:`lsh_function` then builds the body that runtimes without a kernel for the node inline (ONNX
Runtime always does; TensorRT does when no plugin is registered). The body computes exactly what
``reformer_dist.model.lsh.lsh_attention_reference`` computes:

1. hash    ``argmax(cat[x R, -x R])`` per bucket factor in fp32, padding in the extra bucket;
2. sort    per round by (bucket, position), either by counting (a radix sort of one-hot + CumSum passes
           over digits of at most 32 values, ``LshSpec.counting_digits``: no TopK, so TensorRT's parser
           takes it) or by TopK over the sequence (fewer ops; TensorRT rejects a TopK whose K, here L, can
           reach 3840);
3. attend  in chunks of ``chunk_len`` over the sorted order, the key window of each chunk gathered with
           one index (wrap-around across rounds as the reference), 'chunk' or 'bucket' masks, fp32 softmax;
4. unsort  and combine the rounds with softmax weights of their logsumexps.

Node inputs: qk (B, H, L, D), v (B, H, L, D), rotations (H, D, n_hashes, sum(n_buckets)//2) fp32 and an
optional key_padding_mask (B, L) bool (True = real). Outputs: out (B, H, L, D) in v's type and buckets
(B, H, n_hashes, L) int64 (no round offsets, padding = prod(n_buckets)). L must be a multiple of
chunk_len: the model pads inside the graph.

The body works in fp32 whatever the input precision (counts stay exact). Masked scores are -1e9 (-1e4
for an fp16 model) and self scores -1e5 (-1e3), HF's constants; the reference masks with -inf, which
gives the same softmax because every row holds its self entry. Finite constants keep TensorRT and fp16
engines away from inf - inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from reformer_dist.export.config import LSH_SORTS
from reformer_dist.model.lsh.spec import LshSpec

DOMAIN = "reformer"
OP_TYPE = "LshAttention"
INPUTS = ("qk", "v", "rotations", "key_padding_mask")
OUTPUTS = ("out", "buckets")
_FLOAT_TYPES = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


@dataclass(frozen=True)
class LshNode:
    """One LshAttention node: the model's ``LshSpec`` (its attributes) and whether it takes the padding-mask
    input (all LSH layers of a model share both)."""

    spec: LshSpec
    has_padding_mask: bool

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> LshNode:
        attributes = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        return cls(LshSpec.from_attributes(attributes), has_padding_mask=len(node.input) > 3 and node.input[3] != "")


# ------------------------------------------------------------------------------- the bare node at export
def op_schema() -> onnx.defs.OpSchema:
    """Schema of the node, so onnxscript (inside torch.onnx) can record it with typed inputs/attributes."""
    p, opt = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    a, t = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType
    return onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, 1,
        doc="LSH self-attention (shared QK) of the Reformer; see reformer_dist.export.lsh_onnx.",
        inputs=[p("qk", "T"), p("v", "T"), p("rotations", "R"), p("key_padding_mask", "M", param_option=opt)],
        outputs=[p("out", "T"), p("buckets", "I")],
        type_constraints=[("T", _FLOAT_TYPES, ""), ("R", ["tensor(float)"], ""), ("M", ["tensor(bool)"], ""),
                          ("I", ["tensor(int64)"], "")],
        attributes=[a("window", t.STRING, ""), a("chunk_len", t.INT, ""), a("chunks_before", t.INT, ""),
                    a("chunks_after", t.INT, ""), a("n_hashes", t.INT, ""), a("n_buckets", t.INTS, ""),
                    a("causal", t.INT, "")],
    )


def translate_lsh_attention(qk, v, rotations, key_padding_mask, buckets, n_hashes, n_buckets, chunk_len,
                            chunks_before, chunks_after, window, causal, dropout_p, dropout_seed, head_offset=0,
                            n_heads_total=0):
    """torch.onnx ``custom_translation_table`` entry for ``torch.ops.reformer.lsh_attention.default``.

    Emits the bare node, its attributes the op's ``LshSpec``; inference has no dropout, hashes inside and
    attends over all heads, so ``buckets``, dropout and the head slice are dropped.
    """
    from onnxscript._internal.values import Op, Opset  # onnxscript is only needed at export time

    if buckets is not None:
        raise NotImplementedError("exporting lsh_attention with precomputed buckets (a training path)")
    node = Op(Opset(DOMAIN, 1), OP_TYPE, op_schema())
    inputs = [qk, v, rotations] + ([key_padding_mask] if key_padding_mask is not None else [])
    spec = LshSpec(n_hashes, tuple(n_buckets), chunk_len, chunks_before, chunks_after, window, causal)
    return node(*inputs, **spec.attributes())


# ------------------------------------------------------------------------------------- the function body
class _Body:
    """Accumulates the nodes of a FunctionProto body; each call returns the new value's name(s)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple, str] = {}

    def __call__(self, op_type: str, *inputs: str, n_out: int = 1, name: str | None = None,
                 **attrs) -> str | list[str]:
        outs = [name] if name else [f"{op_type.lower()}_{len(self.nodes)}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A Constant node (deduplicated). Python ints/lists become int64 unless dtype says otherwise."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self("Constant", value=numpy_helper.from_array(arr))
        return self._consts[key]

    def f32(self, value: float) -> str:
        return self.const(value, np.float32)

    def shape(self, *parts: str | list[int]) -> str:
        """A 1-D int64 shape from dynamic (1,)-tensors and literal lists."""
        return self("Concat", *[self.const(p) if isinstance(p, list) else p for p in parts], axis=0)

    def arange(self, stop: str) -> str:
        return self("Range", self.const(0), stop, self.const(1))


def lsh_function(node: LshNode, sort: str = "counting", fp16_constants: bool = False,
                 opset: int = 18) -> onnx.FunctionProto:
    """The FunctionProto ``reformer::LshAttention`` specialised to ``node`` (its spec and inputs).

    ``sort``: 'counting' (TensorRT-parsable) or 'topk'. ``fp16_constants``: the reference's fp16 mask
    constants (-1e4/-1e3) instead of -1e9/-1e5 (export of an fp16 model). ``opset`` must equal the
    model's default-domain opset (the checker rejects a mismatch).
    """
    if sort not in LSH_SORTS:
        raise ValueError(f"sort must be one of {LSH_SORTS}, got {sort!r}")
    g = _Body()
    spec, has_padding_mask = node.spec, node.has_padding_mask
    n, c = spec.n_hashes, spec.chunk_len
    n_real = spec.n_real_buckets
    n_slots = n_real + 1 if has_padding_mask else n_real  # the padding bucket sorts last
    masked, self_masked = (-1e4, -1e3) if fp16_constants else (-1e9, -1e5)

    # ---- dynamic sizes, as (1,) tensors (b1, h1, l1, d1) and scalars (for Range)
    shape = g("Shape", "qk")
    b1, h1, l1, d1 = (g("Gather", shape, g.const([i]), axis=0) for i in range(4))
    length = g("Squeeze", l1, g.const([0]))
    n_bh = g("Squeeze", g("Mul", b1, h1), g.const([0]))
    n_total = g("Mul", length, g.const(n))  # n*L sorted entries per (batch, head)
    qc, offsets = spec.compute_chunks()  # chunk length of the layout (c for 'chunk' windows)
    n_chunks = g("Div", n_total, g.const(qc))

    # ---- 1. hash in fp32: rotated (B, H, n, L, R/2); one argmax per bucket factor
    x = g("Cast", "qk", to=TensorProto.FLOAT)
    rot = g("Reshape", g("Cast", "rotations", to=TensorProto.FLOAT), g.const([0, 0, -1]))  # (H, D, n*R/2)
    rotated = g("Reshape", g("MatMul", x, rot), g.const([0, 0, 0, n, -1]))  # (B, H, L, n, R/2)
    rotated = g("Transpose", rotated, perm=[0, 1, 3, 2, 4])
    buckets, offset, stride = None, 0, 1
    for factor in spec.n_buckets:
        part = rotated if len(spec.n_buckets) == 1 else \
            g("Slice", rotated, g.const([offset]), g.const([offset + factor // 2]), g.const([4]))
        # argmax(cat[p, -p]) without writing the concatenation: the first maximum lies in the first half
        # exactly when max(p) >= max(-p) = -min(p); argmin(p) is the first maximum of -p
        top = g("ReduceMax", part, g.const([4]), keepdims=0)
        low = g("ReduceMin", part, g.const([4]), keepdims=0)
        b = g("Where", g("GreaterOrEqual", top, g("Neg", low)), g("ArgMax", part, axis=4, keepdims=0),
              g("Add", g("ArgMin", part, axis=4, keepdims=0), g.const(factor // 2)))  # (B, H, n, L)
        buckets = b if buckets is None else g("Add", buckets, g("Mul", b, g.const(stride)))
        offset += factor // 2
        stride *= factor
    if has_padding_mask:
        real = g("Unsqueeze", "key_padding_mask", g.const([1, 2]))  # (B, 1, 1, L)
        buckets = g("Where", real, buckets, g.const(n_real))
    buckets = g("Identity", buckets, name="buckets")

    # ---- 2. per round, sort by (bucket, position): rank = position -> slot, order = slot -> position
    positions = g.arange(length)  # (L,)
    zeros = g("Mul", buckets, g.const(0))
    if sort == "counting":
        # least-significant-digit radix sort: one stable counting pass per digit of the bucket (at most
        # COUNTING_DIGIT_MAX values), so the one-hot counts are B*H*n*L*width wide, not B*H*n*L*n_buckets
        order = g("Add", zeros, positions)  # slot -> position of the order so far (identity at first)
        widths, stride = spec.counting_digits(has_padding_mask), 1
        for i, width in enumerate(widths):
            digit = g("Div", buckets, g.const(stride)) if stride > 1 else buckets
            digit = g("Mod", digit, g.const(width)) if i < len(widths) - 1 else digit
            stride *= width
            keys = digit if i == 0 else g("GatherElements", digit, order, axis=3)  # the digit in each slot
            onehot = g("Cast", g("Equal", g("Unsqueeze", keys, g.const([-1])), g.const(np.arange(width))),
                       to=TensorProto.FLOAT)  # (B, H, n, L, width)
            within = g("CumSum", onehot, g.const(3))  # inclusive count of each value up to each slot
            counts = g("Gather", within, g("Sub", length, g.const(1)), axis=3)  # (B, H, n, width): last row
            starts = g("CumSum", counts, g.const(3), exclusive=1)  # first slot of each value
            # an entry's new slot = its value's first slot + how many of that value came up to it, minus one
            mine = g("Squeeze", g("GatherElements", within, g("Unsqueeze", keys, g.const([-1])), axis=4),
                     g.const([4]))  # (B, H, n, L)
            slot = g("Add", mine, g("GatherElements", starts, keys, axis=3))
            slot = g("Cast", g("Sub", slot, g.f32(1.0)), to=TensorProto.INT64)  # fp32 counts exact below 2**24
            order = g("ScatterElements", zeros, slot, order, axis=3)
        rank = g("ScatterElements", zeros, order, g("Add", zeros, positions), axis=3)
    else:
        keys = g("Add", g("Mul", buckets, l1), positions)  # unique: bucket*L + position
        _, order = g("TopK", keys, l1, n_out=2, axis=3, largest=0, sorted=1)
        rank = g("ScatterElements", zeros, order, g("Add", zeros, positions), axis=3)
    # flatten the rounds: slot r*L + rank of (r, pos); rows of sorted entries in the (B*H*L, D) view
    undo = g("Reshape", g("Add", rank, g("Mul", g.const(np.arange(n).reshape(n, 1)), l1)),
             g.const([0, 0, -1]))  # (B, H, n*L)
    order = g("Reshape", order, g.const([0, 0, -1]))  # (B, H, n*L): original position of each slot
    bh_ids = g("Reshape", g.arange(n_bh), g.shape(b1, h1, [1]))  # (B, H, 1)
    rows = g("Add", order, g("Mul", bh_ids, length))

    # ---- 3. attention over sorted chunks; every chunk's key window gathered by one index
    width = len(offsets) * qc
    chunk_ids = g.arange(n_chunks)
    raw_chunks = g("Add", g("Unsqueeze", chunk_ids, g.const([1])), g.const(offsets))  # (nc, n_off)
    # wrap around (as the reference); the added multiple of nc keeps Mod's operand non-negative
    key_chunks = g("Mod", g("Add", raw_chunks, g("Mul", n_chunks, g.const(max(map(abs, offsets)) + 1))), n_chunks)
    slot = g.const(np.arange(qc).reshape(1, 1, qc))

    def sorted_index(chunks: str) -> str:  # (nc, n_off) chunk ids -> (nc, W) sorted indices
        return g("Reshape", g("Add", g("Mul", g("Unsqueeze", chunks, g.const([2])), g.const(qc)), slot),
                 g.const([0, -1]))

    key_sidx = g("Reshape", sorted_index(key_chunks), g.const([-1]))  # (nc*W,)
    key_rows = g("Gather", rows, key_sidx, axis=2)  # (B, H, nc*W)

    flat = g.shape([-1], d1)
    x_flat = g("Reshape", x, flat)  # (B*H*L, D)
    mean_sq = g("ReduceMean", g("Mul", x_flat, x_flat), g.const([-1]), keepdims=1)
    keys_flat = g("Div", g("Div", x_flat, g("Sqrt", g("Add", mean_sq, g.f32(1e-6)))),
                  g("Sqrt", g("Cast", d1, to=TensorProto.FLOAT)))  # unit length / sqrt(D)
    v_flat = g("Reshape", g("Cast", "v", to=TensorProto.FLOAT), flat)
    chunked, windowed = g.shape(b1, h1, [-1, qc], d1), g.shape(b1, h1, [-1, width], d1)
    q = g("Reshape", g("Gather", x_flat, rows, axis=0), chunked)  # (B, H, nc, qc, D)
    # the windows by one Gather of their rows (shifted copies of the sorted chunks, Slice + Concat, were
    # slower in ONNX Runtime: measured)
    k = g("Reshape", g("Gather", keys_flat, key_rows, axis=0), windowed)  # (B, H, nc, W, D)
    vk = g("Reshape", g("Gather", v_flat, key_rows, axis=0), windowed)
    scores = g("MatMul", q, g("Transpose", k, perm=[0, 1, 2, 4, 3]))  # (B, H, nc, qc, W)

    q_shape, k_shape = g.shape(b1, h1, [-1, qc, 1]), g.shape(b1, h1, [-1, 1, width])
    if spec.window == "chunk":  # causal and padding on original positions (padding keys sit at L)
        key_pos = order
        if has_padding_mask:
            batch_base = g("Reshape", g("Mul", g.arange(g("Squeeze", b1, g.const([0]))), length),
                           g.const([-1, 1, 1]))
            real = g("Gather", g("Reshape", "key_padding_mask", g.const([-1])), g("Add", order, batch_base), axis=0)
            key_pos = g("Where", real, order, l1)
        q_pos = g("Reshape", order, q_shape)
        k_pos = g("Reshape", g("Gather", key_pos, key_sidx, axis=2), k_shape)
        valid = g("GreaterOrEqual", q_pos, k_pos) if spec.causal else g("Less", k_pos, l1)
        # self = the query's own position, in any round (padding queries included): every row has one
        is_self = g("Equal", q_pos, g("Reshape", g("Gather", order, key_sidx, axis=2), k_shape))
        # a sequence within one chunk is one plain attention (as the reference and HF): only the query's own
        # chunk counts (round 0 alone is kept, below); other windows' copies are masked, self included
        plain = g("LessOrEqual", l1, g.const([c]))  # (1,)
        own_chunk = g.const(np.repeat(np.array(offsets) == 0, c), np.bool_)  # (W,)
        counted = g("Or", g("Not", plain), own_chunk)
        valid, is_self = g("And", valid, counted), g("And", is_self, counted)
    else:  # 'bucket': same (round, bucket), sorted index within chunk_len before (or after) the query
        round_keys = g("Add", buckets, g.const(np.arange(n).reshape(n, 1) * n_slots))  # (B, H, n, L)
        slot_round = g("Mul", g("Div", g.arange(n_total), length), length)  # (n*L,): r*L of every slot
        sorted_keys = g("GatherElements", g("Reshape", round_keys, g.const([0, 0, -1])),
                        g("Add", order, slot_round), axis=2)  # (B, H, n*L)
        # a window column's lag (query slot - key slot) does not depend on the chunk: (qc, W) constants
        lag = np.arange(qc)[:, None] - (np.repeat(offsets, qc) * qc + np.tile(np.arange(qc), len(offsets)))
        band = (lag >= (0 if spec.causal else -c)) & (lag <= c)
        others = g.f32(band & (lag != 0))  # in the band, not self
        fill = g.f32(np.where(lag == 0, self_masked, masked))  # what a masked score becomes
        # window columns past either end of the sorted order (wrapped around above) get the key -1, which
        # equals no query's key (keys are >= 0)
        raw_sidx = g("Reshape", sorted_index(raw_chunks), g.const([-1]))  # (nc*W,), not wrapped
        in_range = g("And", g("GreaterOrEqual", raw_sidx, g.const(0)), g("Less", raw_sidx, n_total))
        k_key = g("Where", in_range, g("Gather", sorted_keys, key_sidx, axis=2), g.const(-1))  # (B, H, nc*W)
        q_key, k_key = g("Reshape", sorted_keys, q_shape), g("Reshape", k_key, k_shape)
        # keep = same bucket, in the band, not self; masked entries get -1e5 (self) or -1e9 (the rest).
        # By arithmetic, exact for finite scores (products with 0 or 1): ONNX Runtime's Where over the
        # (B, H, chunks, qc, W) scores took ~20x an elementwise Mul (measured)
        keep = g("Mul", g("Cast", g("Equal", q_key, k_key), to=TensorProto.FLOAT), others)
        scores = g("Add", g("Mul", scores, keep), g("Mul", g("Sub", g.f32(1.0), keep), fill))
    if spec.window == "chunk":  # the same masking for general (B, H, ...) masks
        keep = g("Cast", g("And", valid, g("Not", is_self)), to=TensorProto.FLOAT)
        fill = g("Add", g("Mul", g("Cast", is_self, to=TensorProto.FLOAT), g.f32(self_masked)),
                 g("Mul", g("Cast", g("Not", g("Or", valid, is_self)), to=TensorProto.FLOAT), g.f32(masked)))
        scores = g("Add", g("Mul", scores, keep), fill)
    # softmax max-shifted by hand (TensorRT lowers ReduceLogSumExp without the shift); the logsumexp is
    # kept as (row max, log of the shifted sum): the mask constants put row maxima near -1e5, where
    # one fp32 logsumexp would lose ~1e-2 (the reference keeps them apart for the same reason)
    row_max = g("ReduceMax", scores, g.const([-1]), keepdims=1)  # (B, H, nc, c, 1)
    shifted = g("Exp", g("Sub", scores, row_max))
    total = g("ReduceSum", shifted, g.const([-1]), keepdims=1)
    log_sum = g("Log", total)
    if spec.window == "chunk":  # HF's fp32 arithmetic: exp(s - lse) with lse = max + log(sum) rounded
        norm = g("Exp", g("Sub", row_max, g("Add", row_max, log_sum)))
        o_sorted = g("Mul", g("MatMul", shifted, vk), norm)  # (B, H, nc, c, D)
    else:
        o_sorted = g("MatMul", g("Div", shifted, total), vk)

    # ---- 4. unsort, then combine the rounds: weights softmax_r(row_max_r - max_r row_max + log_sum_r)
    o_rows = g("Add", undo, g("Mul", bh_ids, n_total))
    o = g("Gather", g("Reshape", o_sorted, flat), o_rows, axis=0)  # (B, H, n*L, D)
    o = g("Reshape", o, g.shape(b1, h1, [n, -1], d1))  # (B, H, n, L, D)
    per_round = g.shape(b1, h1, [n, -1, 1])

    def unsort(stat: str) -> str:  # (B, H, nc, c, 1) sorted -> (B, H, n, L, 1)
        return g("Reshape", g("GatherElements", g("Reshape", stat, g.shape(b1, h1, [-1])), undo, axis=2), per_round)

    row_max, log_sum = unsort(row_max), unsort(log_sum)
    if spec.window == "chunk":  # HF: exp(lse_r - logsumexp(lse)), written out as torch.logsumexp computes it
        lse = g("Add", row_max, log_sum)
        skipped = g("And", plain, g.const(np.arange(n).reshape(n, 1, 1) > 0, np.bool_))  # plain: round 0 alone
        lse = g("Where", skipped, g.f32(-math.inf), lse)
        top = g("ReduceMax", lse, g.const([2]), keepdims=1)
        lse_all = g("Add", g("Log", g("ReduceSum", g("Exp", g("Sub", lse, top)), g.const([2]), keepdims=1)), top)
        weights = g("Exp", g("Sub", lse, lse_all))
    else:
        top = g("ReduceMax", row_max, g.const([2]), keepdims=1)
        z = g("Add", g("Sub", row_max, top), log_sum)  # softmax over the rounds, written out: ONNX Runtime's
        z = g("Exp", g("Sub", z, g("ReduceMax", z, g.const([2]), keepdims=1)))  # Softmax transposes a non-last axis
        weights = g("Div", z, g("ReduceSum", z, g.const([2]), keepdims=1))
    out = g("ReduceSum", g("Mul", o, weights), g.const([2]), keepdims=0)
    g("CastLike", out, "v", name="out")

    inputs = list(INPUTS if has_padding_mask else INPUTS[:3])
    return helper.make_function(DOMAIN, OP_TYPE, inputs, list(OUTPUTS), g.nodes,
                                [helper.make_opsetid("", opset)], attributes=list(spec.attributes()),
                                doc_string=f"LSH attention body: {sort} sort, {spec.window} window")


def node_model(lsh_node: LshNode, sort: str = "counting", opset: int = 18) -> onnx.ModelProto:
    """A model of one LshAttention node with its body: op-level tests and benchmarks of the body."""
    f32, mask, spec = TensorProto.FLOAT, lsh_node.has_padding_mask, lsh_node.spec
    bhld = ["B", "H", "L", "D"]
    inputs = [helper.make_tensor_value_info("qk", f32, bhld), helper.make_tensor_value_info("v", f32, bhld),
              helper.make_tensor_value_info("rotations", f32, ["H", "D", spec.n_hashes, "R"])]
    if mask:
        inputs.append(helper.make_tensor_value_info("key_padding_mask", TensorProto.BOOL, ["B", "L"]))
    outputs = [helper.make_tensor_value_info("out", f32, bhld),
               helper.make_tensor_value_info("buckets", TensorProto.INT64, ["B", "H", spec.n_hashes, "L"])]
    node = helper.make_node(OP_TYPE, [i.name for i in inputs], ["out", "buckets"], domain=DOMAIN,
                            **spec.attributes())
    graph = helper.make_graph([node], "lsh_attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
                             functions=[lsh_function(lsh_node, sort, opset=opset)])

"""The ONNX Runtime backend: cached decoding through an export's prefill and decode graphs.

``<stem>.prefill.onnx`` and ``<stem>.decode.onnx`` (``export onnx --generation``) run the same cached
algorithm as PyTorch's ``reformer_dist.model.generation`` with the rotations frozen at export, so greedy
tokens equal the PyTorch backend's. The batch state is the decode graph's cache as ``OrtValue``s plus
each row's next position. IO binding binds each step's ``present.*`` outputs to the very buffers of its
``cache.*`` inputs, so a step updates the cache in place where the provider computes (on a GPU provider
the cache never leaves the device; only the logits come back to the host): a step's cost does not grow
with the cache, which for LSH layers is n_buckets * (chunk_len + 1) entries per round. Joining and leaving run two tiny graphs built here (``Concat``
and ``Gather`` along the batch over every cache tensor) on the same provider, so they stay on the device
too. A batch's rows decode at their own positions; newcomers are prefilled right-padded to one width,
which is exact because every layer the graphs support is strictly causal.

Without the companions :func:`open_onnxruntime` falls back to recomputing the whole sequence with the
main graph for every token (quadratic), and says so in a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reformer_dist.decoding.backend import DecodingBackend, RecomputingBackend
from reformer_dist.export.metadata import generation_paths, read_metadata
from reformer_dist.export.ort_runner import (
    OrtRunner,
    create_session,
    output_device,
    select_providers,
    session_options,
)

log = logging.getLogger("reformer_dist.decoding")

_ONNX_TYPES = {"tensor(float)": 1, "tensor(int64)": 7, "tensor(bool)": 9, "tensor(float16)": 10,
               "tensor(bfloat16)": 16, "tensor(int32)": 6}


@dataclass
class OrtState:
    cache: list[Any]
    """One OrtValue per cache tensor, in ``cache_names`` order, batch first."""
    position: np.ndarray
    """(B,) int64: where each row's next token goes."""


class OrtBackend(DecodingBackend):
    """Sessions over the prefill / decode graphs beside ``model_path`` (see module doc). The main graph
    is opened on the first :meth:`forward` (scoring) only."""

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, providers: list[str] | None = None, threads: int = 0):
        paths = generation_paths(model_path, ".onnx")
        self.model_path, self.providers, self.threads = str(model_path), providers, threads
        self.prefill_session = create_session(paths["prefill"], providers, threads=threads)
        # a decode step is small (one token per row): one intra-op thread, as the PyTorch backend decodes;
        # more only add synchronisation (measured: batch-1 step 6.6 ms on 1 thread, 10.8 ms on 2, busy CPU)
        self.decode_session = create_session(paths["decode"], providers, threads=1)
        self.metadata = read_metadata(self.prefill_session.get_modelmeta().custom_metadata_map)
        self.cache_names: list[str] = json.loads(self.metadata["cache_names"])
        self.max_seq_len = int(self.metadata["max_seq_len"])
        self.pad_multiple = int(self.metadata["pad_multiple"])
        self.vocab_size = int(self.metadata["vocab_size"])
        self.device = output_device(self.decode_session)
        inputs = {i.name: i for i in self.decode_session.get_inputs()}
        specs = [(_ONNX_TYPES[inputs[f"cache.{n}"].type], inputs[f"cache.{n}"].shape) for n in self.cache_names]
        self._concat = _batch_op_session(specs, "Concat", self.decode_session.get_providers(), 1)
        self._gather = _batch_op_session(specs, "Gather", self.decode_session.get_providers(), 1)
        self._runner: OrtRunner | None = None

    def prefill(self, prompts: list[list[int]]) -> tuple[OrtState, np.ndarray]:
        m = self.pad_multiple
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        # the prefill graph takes whole chunk multiples, at least two (see generation_export)
        width = max(2 * m, math.ceil(int(lengths.max()) / m) * m)
        ids = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)], mask[row, : len(prompt)] = prompt, 1
        binding = self.prefill_session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        logits, cache = self._run(self.prefill_session, binding)
        return OrtState(cache, lengths), logits

    def decode(self, state: OrtState, tokens: np.ndarray) -> np.ndarray:
        binding = self.decode_session.io_binding()
        binding.bind_cpu_input("token", np.ascontiguousarray(tokens, dtype=np.int64))
        binding.bind_cpu_input("position", state.position)
        binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
        for name, value in zip(self.cache_names, state.cache):
            # in place: the step writes its new entries into the buffers it reads (the decode graph
            # reads only what it has written, see generation.decode_step), so no step copies the cache
            binding.bind_ortvalue_input(f"cache.{name}", value)
            binding.bind_ortvalue_output(f"present.{name}", value)
        self.decode_session.run_with_iobinding(binding)
        state.position = state.position + 1
        return binding.get_outputs()[0].numpy()

    def _run(self, session, binding) -> tuple[np.ndarray, list[Any]]:
        """Logits to the host, the cache where the provider computes (it feeds the next step)."""
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu" if output.name == "logits" else self.device)
        session.run_with_iobinding(binding)
        logits, *cache = binding.get_outputs()
        return logits.numpy(), cache

    def merge(self, state: OrtState, other: OrtState) -> OrtState:
        binding = self._concat.io_binding()
        for i, (a, b) in enumerate(zip(state.cache, other.cache)):
            binding.bind_ortvalue_input(f"x{i}", a)
            binding.bind_ortvalue_input(f"y{i}", b)
        return OrtState(self._run_batch_op(self._concat, binding), np.concatenate([state.position, other.position]))

    def release(self, state: OrtState, keep: Sequence[int]) -> OrtState | None:
        if not keep:
            return None
        rows = np.asarray(keep, dtype=np.int64)
        binding = self._gather.io_binding()
        for i, value in enumerate(state.cache):
            binding.bind_ortvalue_input(f"x{i}", value)
        binding.bind_cpu_input("rows", rows)
        return OrtState(self._run_batch_op(self._gather, binding), state.position[rows])

    def _run_batch_op(self, session, binding) -> list[Any]:
        for output in session.get_outputs():
            binding.bind_output(output.name, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if self._runner is None:
            self._runner = OrtRunner(self.model_path, self.providers, threads=self.threads)
        mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return self._runner.logits(input_ids, mask)


def _batch_op_session(specs: list[tuple[int, list]], op: str, providers: list[str], threads: int):
    """A session over one ``Concat`` (inputs x_i, y_i) or ``Gather`` (inputs x_i, rows) along axis 0 per
    cache tensor (``specs``: its ONNX element type and shape): how states join and leave without leaving
    the provider's device."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs, outputs, nodes = [], [], []
    for i, (elem, shape) in enumerate(specs):
        rows = ["joined" if op == "Concat" else "kept", *shape[1:]]
        inputs.append(helper.make_tensor_value_info(f"x{i}", elem, shape))
        outputs.append(helper.make_tensor_value_info(f"out{i}", elem, rows))
        if op == "Concat":
            inputs.append(helper.make_tensor_value_info(f"y{i}", elem, ["other", *shape[1:]]))
            nodes.append(helper.make_node("Concat", [f"x{i}", f"y{i}"], [f"out{i}"], axis=0))
        else:
            nodes.append(helper.make_node("Gather", [f"x{i}", "rows"], [f"out{i}"], axis=0))
    if op == "Gather":
        inputs.append(helper.make_tensor_value_info("rows", TensorProto.INT64, ["rows"]))
    model = helper.make_model(helper.make_graph(nodes, f"batch_{op.lower()}", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), session_options("all", threads), providers=providers)


class OrtRecomputeBackend(RecomputingBackend):
    """The main logits graph alone: every token recomputes each whole sequence (the fallback)."""

    name = "onnxruntime"

    def __init__(self, model_path: str | os.PathLike, providers: list[str] | None = None, threads: int = 0):
        self.runner = OrtRunner(model_path, providers, threads=threads)
        self.metadata = self.runner.metadata
        self.max_seq_len = self.runner.max_seq_len
        self.vocab_size = self.runner.vocab_size
        self.pad_token_id = self.runner.config.get("pad_token_id") or 0

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        return self.runner.logits(input_ids, mask)


def open_onnxruntime(model_path: str | os.PathLike, providers: list[str] | None = None,
                     threads: int = 0) -> DecodingBackend:
    """The cached backend when the generation graphs sit beside ``model_path``, else the recomputing one
    (with a warning: its cost per token grows with the sequence)."""
    select_providers(providers)  # a bad provider name fails here, before any session
    if all(p.is_file() for p in generation_paths(model_path, ".onnx").values()):
        return OrtBackend(model_path, providers, threads)
    log.warning("%s has no %s: every generated token recomputes the whole sequence (cost grows with the "
                "length); export with --generation for cached decoding", model_path,
                " / ".join(p.name for p in generation_paths(model_path, ".onnx").values()))
    return OrtRecomputeBackend(model_path, providers, threads)

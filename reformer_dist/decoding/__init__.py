"""The decoding runtime: one sampler, one backend protocol, one continuous batcher, for every backend.

``reformer-dist generate`` and ``reformer-dist serve`` both decode through this package, on PyTorch,
ONNX Runtime or TensorRT alike, so a prompt gives the same greedy text everywhere:

- ``sampler``      ``SamplingParams`` and ``Sampler``: temperature, top-k, top-p, seed, logit_bias and
                   OpenAI's frequency / presence penalties (NumPy, on the host; no torch needed);
- ``backend``      ``DecodingBackend``: ``prefill(prompts) -> (state, logits)``, ``decode(state, tokens)
                   -> logits``, ``merge`` / ``release`` of batch rows, ``score``; ``RecomputingBackend``
                   is the explicit fallback for graphs exported without their generation companions;
- ``batcher``      ``ContinuousBatcher`` (sequences join and leave between steps) and
                   ``generate_stream`` (a fixed set of prompts);
- ``torch_backend``, ``onnxruntime_backend``, ``tensorrt_backend``: the cached backends;
- ``loading``      ``open_model(path)``: backend (inferred from the path), tokenizer and model name.

Only ``torch_backend`` imports torch; serving an ONNX Runtime graph needs neither torch nor DeepSpeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from reformer_dist.decoding.backend import DecodingBackend, RecomputingBackend, TokenScores
from reformer_dist.decoding.batcher import ContinuousBatcher, generate_stream
from reformer_dist.decoding.sampler import Sampler, SamplingParams

if TYPE_CHECKING:
    import torch

    from reformer_dist.model.reformer import ReformerLM


def generate(model: ReformerLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
             seed: int | None = None, attention_mask: torch.Tensor | None = None,
             max_cache_len: int | None = None, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0) -> torch.Tensor:
    """Cached generation with a PyTorch model: the new tokens (B, n), n <= max_new_tokens (fewer once every
    row hit ``eos_token_id``; a finished row repeats it). temperature 0 = greedy. Prompts of different
    lengths are right-padded with ``attention_mask`` (1 = real). ``max_cache_len`` bounds full-attention
    caches. Row i samples from a stream seeded ``seed + i``. The model's rotations are used as they are
    (:meth:`ReformerLM.draw_rotations`); the model itself is not modified."""
    import torch

    from reformer_dist.decoding.torch_backend import TorchBackend
    from reformer_dist.errors import ConfigError

    if not model.config.causal:
        raise ConfigError("model.causal", "generation needs a causal model")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError("input_ids", f"must be (batch, length >= 1), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError("max_new_tokens", f"must be >= 1, got {max_new_tokens}")
    lengths = [input_ids.shape[1]] * input_ids.shape[0]
    if attention_mask is not None:
        lengths = attention_mask.long().sum(-1).tolist()
        expected = torch.arange(input_ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
        if not torch.equal(attention_mask.bool().cpu(), expected) or min(lengths) < 1:
            raise ConfigError("attention_mask", "must mark each row's prompt as 1s followed by 0s (right "
                                                "padding, at least one real token per row)")
    prompts = [row[:n].tolist() for row, n in zip(input_ids.cpu(), lengths)]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                            top_p=1.0 if top_p is None else top_p, seed=seed, frequency_penalty=frequency_penalty,
                            presence_penalty=presence_penalty)
    was_training = model.training
    try:
        backend = TorchBackend(model, input_ids.device, max_cache_len=max_cache_len, freeze=False)
        steps = [torch.from_numpy(t) for t in generate_stream(backend, prompts, params, eos_token_id)]
    finally:
        model.train(was_training)
    return torch.stack(steps, dim=1).to(input_ids.device)


__all__ = ["ContinuousBatcher", "DecodingBackend", "RecomputingBackend", "Sampler", "SamplingParams", "TokenScores",
           "generate", "generate_stream"]

"""Serving building blocks: incremental detokenization with stop strings, sampling, request validation."""

from __future__ import annotations

import numpy as np
import pytest

from reformer_dist.data.tokenizer import ByteTokenizer
from reformer_dist.decoding.sampler import SamplingParams, choose_token, top_logprobs
from reformer_dist.serve.protocol import ApiError, CompletionRequest, parse_json, validate
from reformer_dist.serve.textstream import TextStream


def stream_text(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    tok = ByteTokenizer()
    ts = TextStream(tok, stop)
    deltas = []
    for t in tok.encode(text):
        deltas.append(ts.push(t))
        if ts.stopped:
            break
    deltas.append(ts.finish())
    return deltas, "".join(deltas), ts.stopped


def test_text_stream_releases_all_text_without_stops():
    _, text, stopped = stream_text("hello wörld ✓")
    assert text == "hello wörld ✓" and not stopped


def test_text_stream_never_releases_half_a_utf8_character():
    deltas, _, _ = stream_text("a✓b")  # ✓ is three bytes
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:4] == ["a", "", "", "✓"]


@pytest.mark.parametrize(("text", "stop", "expected"), [
    ("one two\n\nthree", ("\n\n",), "one two"),
    ("abcabd", ("abd",), "abc"),  # 'ab' is held back, released when 'c' diverges, then stop matches
    ("xyz", ("q", "y"), "x"),
    ("no stop here", ("zzz",), "no stop here"),
])
def test_text_stream_cuts_before_the_first_stop_string(text, stop, expected):
    deltas, out, stopped = stream_text(text, stop)
    assert out == expected
    assert stopped == (expected != text)
    # the stop string itself never leaves the server, not even a prefix of it that later completes
    assert all(s not in "".join(deltas) for s in stop)


def test_greedy_picks_the_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert choose_token(logits, SamplingParams(max_tokens=1, temperature=0.0), rng) == 1


def test_sampling_is_reproducible_for_a_seed_and_respects_top_k():
    logits = np.random.default_rng(1).normal(size=50).astype(np.float32)
    params = SamplingParams(max_tokens=1, temperature=1.5, top_k=3, seed=7)
    draws = [[choose_token(logits, params, np.random.default_rng(7)) for _ in range(1)] for _ in range(3)]
    assert draws[0] == draws[1] == draws[2]
    rng = np.random.default_rng(7)
    allowed = set(np.argsort(-logits)[:3].tolist())
    assert {choose_token(logits, params, rng) for _ in range(200)} <= allowed


def test_top_p_keeps_only_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.8)
    assert {choose_token(logits, params, rng) for _ in range(300)} == {0, 1}


def test_top_logprobs_are_sorted_most_likely_first():
    logp = np.log(np.array([0.1, 0.5, 0.15, 0.25]))
    assert [i for i, _ in top_logprobs(logp, 3)] == [1, 3, 2]


@pytest.mark.parametrize(("body", "param"), [
    (b'{"prompt": "a", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "a", "max_tokens": true}', "max_tokens"),
    (b'{"prompt": "a", "max_tokens": -3}', "max_tokens"),
    (b'{"prompt": "a", "temperature": NaN}', None),
    (b'{"prompt": "a", "temprature": 0.5}', "temprature"),
    (b'{"prompt": ["a", 3]}', "prompt"),
    (b'{"prompt": []}', "prompt"),
    (b'{"prompt": "a", "top_p": 0}', "top_p"),
    (b'[1, 2]', None),
    (b'{"prompt": "\xff"}', None),
    (b'{"prompt": "a"', None),
    (b"[" * 100_000 + b"]" * 100_000, None),
])
def test_invalid_requests_are_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as e:
        validate(CompletionRequest, parse_json(body))
    assert e.value.status == 400
    assert e.value.param == param
    assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_serve_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    import argparse

    from reformer_dist.commands import serve
    from reformer_dist.errors import ConfigError

    config = tmp_path / "run.yaml"
    config.write_text("model: {d_model: 64}\nserve: {max_batch_size: 4, port: 9000, request_timeout_s: 5}\n")
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    args = parser.parse_args(["--model", "m.onnx", "--backend", "onnxruntime", "--config", str(config),
                              "--port", "9001"])
    cfg = serve.serve_config(args)
    assert (cfg.max_batch_size, cfg.port, cfg.request_timeout_s, cfg.host) == (4, 9001, 5.0, "127.0.0.1")

    config.write_text("serve: {max_batch_sise: 4}\n")
    with pytest.raises(ConfigError, match=r"serve\.max_batch_sise"):
        serve.serve_config(args)
    config.write_text("serve: {port: -1}\n")
    args.port = None
    with pytest.raises(ConfigError, match=r"serve\.port"):
        serve.serve_config(args)


def test_backend_is_inferred_from_the_model_path(tmp_path):
    from reformer_dist.decoding.loading import infer_backend
    from reformer_dist.errors import ReformerDistError

    assert infer_backend("runs/tiny/model.onnx") == "onnxruntime"
    assert infer_backend("model.plan") == infer_backend("model.engine") == "tensorrt"
    assert infer_backend(tmp_path) == "torch"  # a checkpoint directory
    with pytest.raises(ReformerDistError, match="--backend"):
        infer_backend(tmp_path / "model.bin")

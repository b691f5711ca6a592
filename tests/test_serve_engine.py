"""The HTTP app and its batching engine, in process, on a counting backend (next token = last + 1).

The backend is deliberately trivial so these tests check the serving logic alone — batching, joins and
leaves between steps, limits, timeouts, streaming, scoring — in milliseconds. The real model is served
in tests/test_serve_server.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reformer_dist.data.tokenizer import ByteTokenizer
from reformer_dist.decoding.backend import DecodingBackend, RecomputingBackend
from reformer_dist.decoding.sampler import log_softmax
from reformer_dist.serve.app import create_app
from reformer_dist.serve.config import ServeConfig


class CountingBackend(RecomputingBackend):
    """Logits favour (last token + 1) mod 256 at every position; each forward sleeps ``delay`` seconds."""

    name = "counting"
    vocab_size = 256

    def __init__(self, max_seq_len: int = 64, delay: float = 0.0):
        self.max_seq_len = max_seq_len
        self.delay = delay
        self.batches: list[int] = []

    def forward(self, input_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        self.batches.append(len(input_ids))
        b, t = input_ids.shape
        logits = np.zeros((b, t, 256), dtype=np.float32)
        logits[np.arange(b)[:, None], np.arange(t)[None, :], (input_ids + 1) % 256] = 4.0
        return logits


def run_app(backend: DecodingBackend, fn, **cfg):
    """Run ``await fn(client)`` against a fresh app (lifespan included) and return its result."""
    app = create_app(backend, ByteTokenizer(), ServeConfig(**cfg), "counting")

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
                return await fn(client)

    return asyncio.run(main())


def complete(client, **body):
    return client.post("/v1/completions", json={"temperature": 0, **body})


def metric_samples(text: str, name: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {s.name + json.dumps(s.labels, sort_keys=True): s.value for s in family.samples}
    raise AssertionError(f"metric {name} not exported")


def test_greedy_completion_follows_the_model():
    async def go(client):
        return (await complete(client, prompt="abc", max_tokens=5)).json()

    out = run_app(CountingBackend(), go)
    assert out["choices"][0]["text"] == "defgh"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_concurrent_requests_share_decode_steps():
    backend = CountingBackend(delay=0.002)

    async def go(client):
        rs = await asyncio.gather(*[complete(client, prompt=chr(65 + i), max_tokens=4) for i in range(16)])
        return rs, (await client.get("/metrics")).text

    responses, metrics = run_app(backend, go, max_batch_size=8, batch_window_ms=20)
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["choices"][0]["text"] for r in responses] == [
        "".join(chr(65 + i + k) for k in range(1, 5)) for i in range(16)]
    assert max(backend.batches) == 8
    batch = metric_samples(metrics, "reformer_batch_size")
    assert batch['reformer_batch_size_sum{}'] / batch['reformer_batch_size_count{}'] > 1


def test_short_request_joins_and_leaves_while_a_long_one_runs():
    backend = CountingBackend(max_seq_len=512, delay=0.002)

    async def go(client):
        long = asyncio.create_task(complete(client, prompt="a", max_tokens=200))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        short = await complete(client, prompt="b", max_tokens=3)
        short_s = time.perf_counter() - t0
        return short, short_s, await long

    short, short_s, long = run_app(backend, go)
    assert short.json()["choices"][0]["text"] == "cde"
    assert long.json()["usage"]["completion_tokens"] == 200
    assert 2 in backend.batches  # the two sequences were decoded in the same steps
    assert short_s < 0.3  # it did not wait for the 200-token request to end


def test_full_queue_answers_429_and_recovers():
    backend = CountingBackend(max_seq_len=512, delay=0.002)

    async def go(client):
        busy = [asyncio.create_task(complete(client, prompt="a", max_tokens=100)) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await complete(client, prompt="b", max_tokens=1)
        await asyncio.gather(*busy)
        return refused, await complete(client, prompt="b", max_tokens=1)

    refused, later = run_app(backend, go, max_concurrency=2, max_batch_size=1)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert later.status_code == 200


def test_request_timeout_is_504_in_the_openai_error_shape():
    backend = CountingBackend(max_seq_len=512, delay=0.01)

    async def go(client):
        return await complete(client, prompt="a", max_tokens=400)

    r = run_app(backend, go, request_timeout_s=0.2)
    assert r.status_code == 504
    assert r.json()["error"]["type"] == "timeout_error"


def test_stream_sends_deltas_then_done_and_stops_before_the_stop_string():
    async def go(client):
        r = await complete(client, prompt="a", max_tokens=10, stream=True, stop=["ef"],
                           stream_options={"include_usage": True})
        return r

    r = run_app(CountingBackend(), go)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == "bcd"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 5  # b c d e f: generated, though not all shown


def test_prompt_list_and_n_give_one_choice_each_with_seeded_samples_reproducible():
    async def go(client):
        body = {"prompt": ["a", "k"], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 5}
        first = (await client.post("/v1/completions", json=body)).json()
        second = (await client.post("/v1/completions", json=body)).json()
        return first, second

    first, second = run_app(CountingBackend(), go)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]


def test_logprobs_report_the_model_distribution():
    async def go(client):
        return (await complete(client, prompt="a", max_tokens=2, logprobs=2)).json()

    lp = run_app(CountingBackend(), go)["choices"][0]["logprobs"]
    expected = log_softmax(np.eye(256, dtype=np.float32)[ord("b")] * 4.0)[ord("b")]
    assert lp["tokens"] == ["b", "c"]
    assert lp["token_logprobs"][0] == pytest.approx(expected)
    assert next(iter(lp["top_logprobs"][0])) == "b" and len(lp["top_logprobs"][0]) == 2
    assert lp["text_offset"] == [0, 1]


def test_prompt_longer_than_the_context_is_rejected_clearly():
    async def go(client):
        return await complete(client, prompt="x" * 64, max_tokens=1)

    r = run_app(CountingBackend(max_seq_len=64), go)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "max_seq_len is 64" in r.json()["error"]["message"]


def test_generation_stops_at_max_seq_len():
    async def go(client):
        return (await complete(client, prompt="x" * 60, max_tokens=50)).json()

    out = run_app(CountingBackend(max_seq_len=64), go)
    assert out["usage"]["completion_tokens"] == 4
    assert out["choices"][0]["finish_reason"] == "length"


def test_limits_body_size_and_max_tokens_cap():
    async def go(client):
        big = await client.post("/v1/completions", content=b'{"prompt": "' + b"a" * 5000 + b'"}',
                                headers={"content-type": "application/json"})
        capped = await complete(client, prompt="a", max_tokens=33)
        return big, capped

    big, capped = run_app(CountingBackend(), go, max_body_bytes=4096, max_tokens_cap=32)
    assert big.status_code == 413
    assert capped.status_code == 400 and capped.json()["error"]["param"] == "max_tokens"


def test_bodies_not_declared_json_get_415():
    body = b'{"prompt": "a", "max_tokens": 1}'

    async def go(client):
        return [(await client.post(path, content=body, headers=headers)).status_code
                for path in ("/v1/completions", "/v1/score")
                for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"})]

    codes = run_app(CountingBackend(), go)
    assert codes == [415] * 6
    ok = run_app(CountingBackend(), lambda client: client.post(
        "/v1/completions", content=body, headers={"content-type": "application/json; charset=utf-8"}))
    assert ok.status_code == 200


def test_score_matches_the_model_log_likelihood():
    async def go(client):
        return (await client.post("/v1/score", json={"text": ["abcd", "azzz"]})).json()

    data = run_app(CountingBackend(), go)["data"]
    hit = float(log_softmax(np.eye(256, dtype=np.float32)[1] * 4.0)[1])  # log p of the favoured token
    miss = float(log_softmax(np.eye(256, dtype=np.float32)[1] * 4.0)[2])
    assert data[0]["log_likelihood"] == pytest.approx(3 * hit)
    assert data[1]["log_likelihood"] == pytest.approx(miss + miss + miss)
    assert data[0]["bits_per_byte"] == pytest.approx(-3 * hit / math.log(2) / 3)
    assert data[0]["bits_per_token"] == data[0]["bits_per_byte"]  # one byte per token


def test_torch_backend_batch_equals_recomputation_as_sequences_join_and_leave():
    import torch

    from reformer_dist.decoding.batcher import ContinuousBatcher
    from reformer_dist.decoding.torch_backend import TorchBackend
    from reformer_dist.model import ReformerConfig, ReformerLM

    torch.manual_seed(0)
    cfg = ReformerConfig(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=3,
                         attn_layers=["local", "lsh", "full"], lsh_chunk_len=4, local_chunk_len=4, max_seq_len=64)
    backend = TorchBackend(ReformerLM(cfg))  # no hash_seed: the backend freezes the model's one draw

    rng = np.random.default_rng(0)
    arrivals = {0: [5, 9, 5], 2: [3], 3: [9], 6: [12]}  # step -> prompt lengths joining then
    batcher = ContinuousBatcher(backend)
    tokens: dict[int, list[int]] = {}
    for step in range(12):
        logits = batcher.decode({k: tokens[k][-1] for k in batcher.members}) if batcher.members else np.zeros((0, 256))
        rows = dict(zip(batcher.members, logits))
        new = [rng.integers(0, 256, n).tolist() for n in arrivals.get(step, [])]
        if new:
            ids = list(range(len(tokens), len(tokens) + len(new)))
            tokens.update(zip(ids, new))
            rows.update(zip(ids, batcher.join(ids, new)))
        members = list(rows)
        recomputed = backend.last_logits([tokens[k] for k in members])  # whole sequences, no cache
        np.testing.assert_allclose(np.stack([rows[k] for k in members]), recomputed, atol=2e-4)
        for k in members:
            tokens[k].append(int(rows[k].argmax()))
        if step in (4, 8):  # the oldest sequence leaves
            batcher.leave([batcher.members[0]])


def test_a_failing_model_step_fails_its_batch_with_500_and_the_server_carries_on():
    class FailsOnBang(CountingBackend):
        def forward(self, input_ids, lengths):
            if (input_ids == ord("!")).any():
                raise RuntimeError("kernel exploded")
            return super().forward(input_ids, lengths)

    async def go(client):
        bad = await complete(client, prompt="boom!", max_tokens=3)
        good = await complete(client, prompt="a", max_tokens=3)
        return bad, good, await client.get("/health")

    bad, good, health = run_app(FailsOnBang(), go)
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "server_error"
    assert good.json()["choices"][0]["text"] == "bcd"
    assert health.json() == {"status": "ok"}


class FavouritesBackend(CountingBackend):
    """Every position: logit 4 for 'x', 3 for 'y', 0 elsewhere (greedy repeats 'x' until penalised)."""

    def forward(self, input_ids, lengths):
        logits = np.zeros((*input_ids.shape, 256), dtype=np.float32)
        logits[..., ord("x")], logits[..., ord("y")] = 4.0, 3.0
        return logits


@pytest.mark.parametrize(("extra", "text"), [
    ({}, "xxxx"),
    ({"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}, "xxxx"),  # what clients send
    ({"frequency_penalty": 2.0}, "xyxy"),  # x: 4, 4-2, 4-4 ...; y: 3, 3-2 ...
    ({"presence_penalty": 2.0}, "xyxx"),  # once generated, 4-2 and 3-2 whatever the count
    ({"frequency_penalty": -1.0, "logit_bias": {str(ord("y")): 1.5}}, "yyyy"),  # 4.5 > 4; repeats pull
    ({"logit_bias": {str(ord("x")): -100}}, "yyyy"),
])
def test_penalties_and_logit_bias_follow_openai(extra, text):
    async def go(client):
        return (await complete(client, prompt="a", max_tokens=4, **extra)).json()

    assert run_app(FavouritesBackend(), go)["choices"][0]["text"] == text


def test_echo_prefixes_the_prompt_and_its_logprobs():
    async def go(client):
        plain = (await complete(client, prompt="abc", max_tokens=2, echo=True)).json()
        scored = (await complete(client, prompt="abc", max_tokens=2, echo=True, logprobs=1)).json()
        only = (await complete(client, prompt="abc", max_tokens=0, echo=True, logprobs=0)).json()
        stream = await complete(client, prompt="abc", max_tokens=2, echo=True, stream=True)
        refused = await complete(client, prompt="abc", max_tokens=0)
        return plain, scored, only, stream, refused

    plain, scored, only, stream, refused = run_app(CountingBackend(), go)
    assert plain["choices"][0]["text"] == "abcde"
    lp = scored["choices"][0]["logprobs"]
    hit = float(log_softmax(np.eye(256, dtype=np.float32)[1] * 4.0)[1])  # the counting model's favourite
    assert lp["tokens"] == list("abcde") and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # the first token has no context
    assert lp["token_logprobs"][1:] == pytest.approx([hit] * 4)
    assert only["choices"][0]["text"] == "abc" and only["choices"][0]["finish_reason"] == "length"
    assert only["usage"]["completion_tokens"] == 0 and only["choices"][0]["logprobs"]["tokens"] == list("abc")
    chunks = [json.loads(e[6:]) for e in stream.text.split("\n\n") if e.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == "abc"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "abcde"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize(("extra", "param"), [
    ({"best_of": 3}, "best_of"),
    ({"suffix": "the end"}, "suffix"),
    ({"logit_bias": {"300": 1}}, "logit_bias"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
])
def test_unsupported_or_out_of_range_fields_are_400_naming_them(extra, param):
    async def go(client):
        return await complete(client, prompt="a", max_tokens=2, **extra)

    r = run_app(CountingBackend(), go)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_needs_a_chat_template(tmp_path):
    messages = [{"role": "user", "content": "ab"}]

    async def go(client):
        return await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3, "temperature": 0})

    refused = run_app(CountingBackend(), go)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "chat_template_missing"
    assert "base language model" in refused.json()["error"]["message"]
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.role[0] }}:{{ m.content }}{% endfor %}"
                        "{% if add_generation_prompt %}>{% endif %}")
    answer = run_app(CountingBackend(), go, chat_template=str(template)).json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "?@A"}  # after 'u:ab>'

"""`reformer-dist serve` end to end: a real server process on a free loopback port with a tiny model.

The server runs with ``deepspeed``, ``wandb`` and ``reformer_dist.train`` poisoned in ``sys.modules``, so
any import of the training stack on the serving path makes it fail to start. One torch-backend server
is shared by the module; the ONNX Runtime and SIGTERM tests start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from reformer_dist.artifacts.native import save_native
from reformer_dist.cli import main
from reformer_dist.model import ReformerConfig, ReformerLM

openai = pytest.importorskip("openai", reason="the openai client is part of the test extra")

POISONED = ("deepspeed", "wandb", "reformer_dist.train")
LAUNCH = ("import sys\n"
          f"for name in {POISONED!r}:\n"
          "    sys.modules[name] = None  # importing it now raises ImportError\n"
          "from reformer_dist.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")
MAX_BODY = 65536


def tiny_config() -> ReformerConfig:
    # local + LSH layers; hash_seed fixes the rotations so every forward hashes alike (deterministic serving)
    return ReformerConfig(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=2,
                          attn_layers=["local", "lsh"], lsh_chunk_len=8, local_chunk_len=8, max_seq_len=256,
                          hash_seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A native checkpoint directory: model.safetensors + config.yaml + tokenizer.json (the spec)."""
    torch.manual_seed(0)
    return save_native(ReformerLM(tiny_config()), tmp_path_factory.mktemp("models") / "tiny",
                       tokenizer={"kind": "bytes", "offset": 0})


class Server:
    def __init__(self, *args: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", "--port", "0", "--threads", "1",
                                      "--log-level", "warning", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.output: list[str] = []
        deadline = time.monotonic() + 90
        for line in self.proc.stdout:  # the server prints its address once it accepts connections
            self.output.append(line)
            if "listening on" in line:
                self.url = line.split("listening on ")[1].strip()
                break
            if time.monotonic() > deadline:
                break
        else:
            raise AssertionError("server did not start:\n" + "".join(self.output))
        # keep draining its output so it never blocks on a full pipe
        self._reader = threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server("--model", str(checkpoint), "--backend", "torch", "--max-batch-size", "8",
               "--max-concurrency", "64", "--max-tokens-cap", "64", "--batch-window-ms", "20",
               "--max-body-bytes", str(MAX_BODY))
    yield s
    assert s.stop() == 0, "".join(s.output)


@functools.cache
def reference_model(checkpoint: Path) -> ReformerLM:
    from reformer_dist.artifacts.model_source import load_model

    return load_model(checkpoint).model.freeze_rotations()  # the rotations every backend uses


@contextlib.contextmanager
def one_thread():
    """Reference forwards on one thread: the servers under test busy the cores, and contended OpenMP
    threads spin (a tiny forward goes from milliseconds to a fraction of a second)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy_reference(checkpoint: Path, prompt: str, n: int) -> str:
    """The model's own greedy continuation through the Python API (argmax of the last position)."""
    model = reference_model(checkpoint)
    ids = list(prompt.encode())
    with torch.inference_mode(), one_thread():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return bytes(ids[len(prompt.encode()):]).decode("utf-8", errors="replace")


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def batch_size_stats(url: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "reformer_batch_size":
            values = {s.name: s.value for s in family.samples}
            return values["reformer_batch_size_sum"], values["reformer_batch_size_count"]
    raise AssertionError("reformer_batch_size is not exported")


def reformer_dist_generate(checkpoint: Path, prompt: str, n: int) -> str:
    """Greedy text of `reformer-dist generate` (cached decoding) on the same checkpoint."""
    out = subprocess.run([sys.executable, "-m", "reformer_dist", "generate", "--checkpoint", str(checkpoint),
                          "--prompt", prompt, "--max-new-tokens", str(n), "--temperature", "0"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


def test_openai_client_plain_and_streamed_greedy_text_equals_generate(server, checkpoint):
    assert server.url.startswith("http://127.0.0.1:")  # loopback unless told otherwise
    expected = reformer_dist_generate(checkpoint, "def main():", 24)
    assert expected == greedy_reference(checkpoint, "def main():", 24)  # cached == recomputed decoding
    c = client(server)
    assert [m.id for m in c.models.list().data] == [checkpoint.name]
    plain = c.completions.create(model=checkpoint.name, prompt="def main():", max_tokens=24, temperature=0)
    assert plain.choices[0].text == expected
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == 24
    streamed = c.completions.create(model=checkpoint.name, prompt="def main():", max_tokens=24, temperature=0,
                                    stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected


def test_64_concurrent_requests_all_succeed_and_are_batched(server, checkpoint):
    sum0, count0 = batch_size_stats(server.url)

    async def burst():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        return await asyncio.gather(*[
            c.completions.create(model=checkpoint.name, prompt=f"x = {i}", max_tokens=8, temperature=0)
            for i in range(64)])

    results = asyncio.run(burst())
    assert all(r.usage.completion_tokens == 8 for r in results)
    assert results[7].choices[0].text == greedy_reference(checkpoint, "x = 7", 8)
    sum1, count1 = batch_size_stats(server.url)
    assert (sum1 - sum0) / (count1 - count0) > 1, "the 64 requests were decoded one at a time"


def malformed_requests(n: int) -> list[tuple[str, bytes | None, dict]]:
    """``n`` (path, body, headers) that must each get a 4xx: bad JSON, wrong types, bad values, unknown
    fields, invalid UTF-8, oversized bodies (declared and chunked), cycled with harmless valid extras."""
    ok = {"prompt": "hi", "max_tokens": 2}
    bodies: list[bytes] = [
        b"", b"{", b"}", b"[", b'{"prompt": "a",}', b"{'prompt': 'a'}", b'{"prompt": "a"} trailing', b"nul",
        b'{"prompt": NaN}', b'{"prompt": "a", "temperature": Infinity}', b"\x00\x01\x02", b'"just a string"',
        b"[1, 2, 3]", b"42", b"null", b"true", b"[" * 50_000,
        b'{"prompt": "\xff\xfe"}', b"\xc3\x28", b'{"prompt": "caf\xe9"}', b'{"prompt": "\xed\xa0\x80"}',
        b'{"prompt": "\\ud800"}', b'{"prompt": "a", "stop": "\\udfff"}',
        b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}",
    ]
    wrong = {
        "prompt": [None, 5, 1.5, True, {"a": 1}, [1, 2], [["a"]], [], "", "x" * 300],
        "max_tokens": ["5", 2.5, True, [], {}, -1, 0, 65, 10**6, 10**30, 1e309],
        "temperature": ["0", [], True, -0.1, 2.5, 1e9],
        "top_p": ["1", 0, -1, 1.5, False],
        "top_k": [-1, 1.5, "3", True],
        "stop": [5, [1], ["a", "b", "c", "d", "e"], [""], {"s": 1}],
        "seed": ["1", 1.5, [], True],
        "stream": ["yes", 1, [], None],
        "stream_options": [True, {"include_usage": "yes"}, {"bogus": 1}],
        "logprobs": [-1, 6, "2", 1.5],
        "n": [0, -2, 1000, "2", 1.5],
        "model": [5, [], {}, "no-such-model"],
        "user": [5, []],
        "echo": ["yes", 1], "suffix": ["x"], "best_of": [2, 0], "logit_bias": [{"x": 1}, {"999": 1}, [1], {"3": 200}],
        "presence_penalty": [2.5, "0.5"], "frequency_penalty": [-3, None],
        "temprature": [0.5], "max_token": [5], "": [1],
    }
    for field, values in wrong.items():
        bodies += [json.dumps({**ok, field: v}).encode() for v in values]
    requests: list[tuple[str, bytes | None, dict]] = [("/v1/completions", b, {}) for b in bodies]
    requests += [("/v1/score", b, {}) for b in (b"{", b'{"text": 5}', b'{"text": "a"}', b'{"text": []}',
                                                 b'{"text": "ok", "extra": 1}', b'{"text": "' + b"y" * 300 + b'"}',
                                                 b'{"texts": ["a"]}', b'{"text": ["ab", 7]}')]
    big = json.dumps({**ok, "prompt": "z" * (MAX_BODY + 10)}).encode()
    requests += [("/v1/completions", big, {}), ("/v1/score", big, {})]
    requests += [("/v1/completions", None, {"chunked": big})]  # no Content-Length: counted while reading
    requests += [("/v1/completions", b"x", {"content-length": str(10**12)})]  # declared: refused before reading

    rng = random.Random(0)
    out = []
    for i in range(n):
        path, body, headers = requests[i % len(requests)]
        if i >= len(requests) and body is not None and body.startswith(b"{") and rng.random() < 0.5:
            # same defect, different company: prepend valid fields (JSON keeps the last duplicate)
            extra = {"temperature": rng.choice([0, 0.7, 1.0]), "top_p": rng.choice([0.5, 1.0])}
            body = json.dumps(extra).encode()[:-1] + b", " + body[1:] if body != b"{" else body
        out.append((path, body, headers))
    return out


def raw_post(url: str, path: str, body: bytes, content_length: str) -> httpx.Response:
    """A POST whose Content-Length lies (httpx refuses to send one): the answer must come before the body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {content_length}\r\n\r\n".encode() + body)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < int(
                raw.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, payload = raw.split(b"\r\n\r\n", 1)
    return httpx.Response(int(head.split(b" ")[1]), content=payload)


def test_500_malformed_requests_get_4xx_json_errors_and_the_server_survives(server, checkpoint):
    requests = malformed_requests(500)
    assert len(requests) == 500
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, headers in requests:
            if "chunked" in headers:
                def chunks(data=headers["chunked"]):
                    for k in range(0, len(data), 4096):
                        yield data[k:k + 4096]
                r = http.post(path, content=chunks(), headers={"content-type": "application/json"})
            elif "content-length" in headers:
                r = raw_post(server.url, path, body, headers["content-length"])
            else:
                r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, body[:200] if body else headers.keys(), r.status_code, r.text)
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"]
            assert isinstance(error["type"], str)
        assert http.get("/health").json() == {"status": "ok"}
        ok = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/completions").status_code == 405
    assert server.proc.poll() is None


def test_score_reports_log_likelihood_and_bits(server, checkpoint):
    text = "print('hello')"
    r = httpx.post(server.url + "/v1/score", json={"text": text}).json()["data"][0]
    model = reference_model(checkpoint)
    ids = torch.tensor([list(text.encode())])
    with torch.inference_mode(), one_thread():
        logp = torch.log_softmax(model(ids)[0, :-1].double(), -1).gather(1, ids[0, 1:, None]).sum()
    assert r["log_likelihood"] == pytest.approx(float(logp), rel=1e-4)
    assert r["bits_per_byte"] == pytest.approx(-float(logp) / len(text[1:]) / 0.6931471805599453, rel=1e-4)


def test_sigterm_drains_in_flight_streams_then_exits_cleanly(checkpoint):
    s = Server("--model", str(checkpoint), "--backend", "torch", "--max-tokens-cap", "200")
    started = threading.Barrier(5)
    results: list[tuple[str, int, bool]] = []

    def stream(i: int) -> None:
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"prompt": f"# {i}", "max_tokens": 200, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            started.wait()
            rest = [line for line in lines if line]
        chunks = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
        usage = [c["usage"] for c in chunks if c.get("usage")]
        results.append((chunks[-2]["choices"][0]["finish_reason"], usage[0]["completion_tokens"] if usage else -1,
                        rest[-1] == "data: [DONE]"))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    started.wait(timeout=60)  # every stream has its first token: all four are in flight
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert s.proc.wait(timeout=60) == 0, "".join(s.output)
    assert sorted(results) == [("length", 200, True)] * 4
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")


def test_serving_path_imports_neither_deepspeed_nor_the_training_code(checkpoint):
    # (the servers above run poisoned too; this names the property on its own)
    probe = (f"import sys\nfor name in {POISONED!r}:\n    sys.modules[name] = None\n"
             "from reformer_dist.serve.app import create_app\n"
             "from reformer_dist.decoding.loading import open_model\n"
             "from reformer_dist.serve.config import ServeConfig\n"
             f"loaded = open_model({str(checkpoint)!r})\n"
             "create_app(loaded.backend, loaded.tokenizer, ServeConfig(), loaded.name)\n"
             "print('clean')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "clean", out.stderr


def test_listening_socket_is_tcp_so_connections_get_nodelay():
    from reformer_dist.serve.server import bind

    # asyncio sets TCP_NODELAY only when the socket's proto says TCP; without it keep-alive responses
    # stall on Nagle + delayed ACK
    with bind("127.0.0.1", 0) as sock:
        assert sock.proto == socket.IPPROTO_TCP


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint accepting 2K-token prompts, without hash_seed (its LSH rotations come from the model's
    one draw alone), and its export with the generation graphs, made through the CLI as a user would."""
    torch.manual_seed(1)
    config = ReformerConfig(vocab_size=256, d_model=32, n_heads=2, d_head=16, d_ff=64, n_layers=2,
                            attn_layers=["local", "lsh"], lsh_chunk_len=32, local_chunk_len=32, max_seq_len=2112,
                            init_std=0.3)
    directory = save_native(ReformerLM(config), tmp_path_factory.mktemp("models") / "long",
                            tokenizer={"kind": "bytes", "offset": 0})
    with one_thread():
        assert main(["export", "onnx", "--checkpoint", str(directory), "--output", str(directory / "model.onnx"),
                     "--generation"]) == 0
    return directory, directory / "model.onnx"


@pytest.fixture(scope="module")
def long_servers(long_model):
    """One server per backend; --backend is inferred from the path."""
    servers = {name: Server("--model", str(path), "--max-batch-size", "8", "--max-tokens-cap", "64",
                            "--batch-window-ms", "20", "--max-body-bytes", str(MAX_BODY))
               for name, path in zip(("torch", "onnxruntime"), long_model)}
    yield servers
    for s in servers.values():
        assert s.stop() == 0, "".join(s.output)


def generate_cli(path: Path, prompt: str, n: int, flag: str) -> str:
    out = subprocess.run([sys.executable, "-m", "reformer_dist", "generate", flag, str(path), "--prompt", prompt,
                          "--max-new-tokens", str(n), "--temperature", "0"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


def test_greedy_text_and_model_id_are_the_same_on_every_backend(long_model, long_servers):
    directory, onnx_path = long_model
    prompt = "def fibonacci(n):\n    a, b = 0, 1\n"
    texts = {"generate --checkpoint": generate_cli(directory, prompt, 32, "--checkpoint"),
             "generate --model": generate_cli(onnx_path, prompt, 32, "--model")}
    for backend, s in long_servers.items():
        c = client(s)
        assert [m.id for m in c.models.list().data] == ["long"]  # the model directory's name, either way
        texts[f"serve {backend}"] = c.completions.create(model="long", prompt=prompt, max_tokens=32,
                                                         temperature=0).choices[0].text
    assert len(set(texts.values())) == 1, texts
    assert len(set(texts["generate --checkpoint"])) > 3  # a real continuation, not one repeated byte


def test_16_concurrent_requests_of_different_lengths_equal_one_at_a_time(long_servers):
    body = "for i in range(10):\n    print(i * i)\n" * 60
    prompts = [body[: 64 + 129 * i + (i == 15)] for i in range(16)]  # 64 ... 2,000 tokens (bytes)
    assert len(prompts[-1]) >= 2000
    for backend, s in long_servers.items():
        c = client(s)
        alone = [c.completions.create(model="long", prompt=p, max_tokens=16 - i % 5, temperature=0).choices[0].text
                 for i, p in enumerate(prompts)]
        sum0, count0 = batch_size_stats(s.url)

        async def burst(url=s.url):
            ac = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
            # different max_tokens: sequences leave the batch at different steps while others continue
            return await asyncio.gather(*[ac.completions.create(model="long", prompt=p, max_tokens=16 - i % 5,
                                                                temperature=0) for i, p in enumerate(prompts)])

        together = [r.choices[0].text for r in asyncio.run(burst())]
        sum1, count1 = batch_size_stats(s.url)
        assert (sum1 - sum0) / (count1 - count0) > 1, f"{backend}: the requests were not batched"
        assert together == alone, backend


def test_onnxruntime_serving_needs_no_torch(long_model):
    probe = ("import sys\nsys.modules['torch'] = None  # importing it now raises ImportError\n"
             "from reformer_dist.decoding import SamplingParams, generate_stream\n"
             "from reformer_dist.decoding.loading import open_model\n"
             "from reformer_dist.serve.app import create_app\n"
             "from reformer_dist.serve.config import ServeConfig\n"
             f"loaded = open_model({str(long_model[1])!r})\n"
             "create_app(loaded.backend, loaded.tokenizer, ServeConfig(), loaded.name)\n"
             "next(generate_stream(loaded.backend, [[1, 2]], SamplingParams(max_tokens=1, temperature=0)))\n"
             "print('clean', loaded.name)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "clean long", out.stderr


def test_openai_client_penalties_change_the_output_as_specified(long_servers):
    c = client(long_servers["onnxruntime"])
    prompt = "x = 1\n" * 8

    def text(**extra) -> str:
        return c.completions.create(model="long", prompt=prompt, max_tokens=24, temperature=0, **extra).choices[0].text

    plain = text()
    assert text(frequency_penalty=0, presence_penalty=0, logit_bias={}) == plain  # what clients send by default
    assert text(logit_bias={str(ord("q")): 100}) == "q" * 24
    repeated = max(set(plain), key=plain.count)
    penalised = text(frequency_penalty=2.0)
    assert penalised != plain and penalised.count(repeated) < plain.count(repeated)


@pytest.mark.tensorrt
def test_tensorrt_backend_decodes_through_its_generation_engines(long_model, tmp_path):
    from reformer_dist.export.tensorrt_build import ShapeProfile, build_engine, build_generation_engines

    directory, onnx_path = long_model
    shapes = ShapeProfile((1, 32), (4, 512), (8, 2112))
    plan = build_engine(onnx_path, tmp_path / "model.plan", shapes=shapes)
    assert len(build_generation_engines(onnx_path, plan, shapes=shapes)) == 2
    s = Server("--model", str(plan), "--max-batch-size", "8")  # --backend inferred from .plan
    try:
        assert "recomputes" not in "".join(s.output)  # cached: no fallback warning
        out = client(s).completions.create(model="long", prompt="import os", max_tokens=16, temperature=0)
        assert out.usage.completion_tokens == 16
        # the engine may use TF32 kernels: compare likelihoods with a tolerance rather than argmax ties
        text = "import numpy as np"
        score = httpx.post(s.url + "/v1/score", json={"text": text}).json()["data"][0]
        ids = torch.tensor([list(text.encode())])
        with torch.inference_mode(), one_thread():
            logits = reference_model(directory)(ids)[0, :-1].double()
        expected = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum()
        assert score["log_likelihood"] == pytest.approx(float(expected), rel=1e-2)
    finally:
        assert s.stop() == 0, "".join(s.output)

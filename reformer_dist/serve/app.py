"""The HTTP API: an OpenAI-compatible completions endpoint plus scoring, health and Prometheus metrics.

    POST /v1/completions        prompt (string or list) → completions, plain JSON or server-sent events;
                                OpenAI's sampling fields (penalties, logit_bias, echo, logprobs, seed...)
    POST /v1/chat/completions   messages → a chat completion, only with a chat template (else 400: a
                                base language model continues text)
    POST /v1/score              text (string or list) → log-likelihood, bits per token and per byte
    GET  /v1/models             the one model this server serves
    GET  /health                200 {"status": "ok"}; 503 while draining or if the engine died
    GET  /metrics               Prometheus text

Bodies are read by hand, not by FastAPI's parameter machinery, so the size cap applies while reading
(before anything is parsed) and every failure, from bad UTF-8 to a wrong type, is answered in OpenAI's
error shape with a 4xx code instead of FastAPI's default ``{"detail": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reformer_dist.data.tokenizer import Tokenizer
from reformer_dist.decoding.backend import DecodingBackend, TokenScores
from reformer_dist.decoding.sampler import SamplingParams
from reformer_dist.serve.chat import ChatTemplate
from reformer_dist.serve.config import ServeConfig
from reformer_dist.serve.metrics import ServerMetrics
from reformer_dist.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ScoreRequest,
    check_text,
    parse_json,
    validate,
)
from reformer_dist.serve.request_engine import (
    Draining,
    Engine,
    Event,
    Overloaded,
    ScoreJob,
    Sequence,
    TokenInfo,
)

log = logging.getLogger("reformer_dist.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions API
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/models", "/health", "/metrics")


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it to its last byte (streams included).
    Unknown paths are counted as 'other' so random URLs cannot blow up the label set."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        t0 = time.perf_counter()

        async def send_and_watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if status >= 400:
                self.metrics.errors.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 415 unless it is declared JSON, and with 413 as soon as it is known
    to exceed ``limit`` bytes."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise ApiError(415, f"Content-Type must be application/json, got {media_type or 'none'}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads carry no Content-Length: count while reading
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(backend: DecodingBackend, tokenizer: Tokenizer, cfg: ServeConfig, model_name: str,
               eos_token_id: int | None = None) -> FastAPI:
    """The server's ASGI app. Its lifespan starts the engine's worker thread and, at shutdown (after
    uvicorn has let in-flight requests finish), stops it."""
    chat_template = ChatTemplate.load(cfg.chat_template) if cfg.chat_template else None
    metrics = ServerMetrics()
    engine = Engine(backend, tokenizer, cfg, metrics, eos_token_id=eos_token_id)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, cfg.drain_timeout_s)

    app = FastAPI(title="reformer-dist", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    # ------------------------------------------------------------------ errors, all in OpenAI's shape
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, "invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(ApiError(500, "internal server error", "server_error").body(), status_code=500)

    # ------------------------------------------------------------------ small endpoints
    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "reformer-dist", "max_model_len": backend.max_seq_len}]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.tokens_per_second.set(engine.tokens_per_second())
        return Response(metrics.render(), media_type=metrics.content_type)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def encode_prompt(text: str, param: str) -> list[int]:
        check_text(text, param)
        ids = tokenizer.encode(text)
        if not ids:
            raise ApiError(400, f"{param} is empty: the model needs at least one token to continue",
                           param=param)
        if len(ids) >= backend.max_seq_len:
            raise ApiError(400, f"{param} has {len(ids)} tokens, but this model's max_seq_len is "
                                f"{backend.max_seq_len}: shorten it so there is room to generate",
                           param=param, code="context_length_exceeded")
        return ids

    def admit(submit: Any, arg: Any) -> None:
        try:
            submit(arg)
        except Overloaded:
            raise ApiError(429, f"the server is at capacity ({cfg.max_concurrency} sequences queued or "
                                f"running); retry later", "rate_limit_error", code="rate_limit_exceeded") from None
        except Draining:
            raise ApiError(503, "the server is shutting down", "server_error") from None

    # ------------------------------------------------------------------ completions
    def sampling_params(req: CompletionRequest | ChatRequest, max_tokens: int) -> SamplingParams:
        """The request's sampling settings, each checked against the server and the vocabulary."""
        if max_tokens > cfg.max_tokens_cap:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's cap of {cfg.max_tokens_cap}",
                           param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        for s in stop:
            check_text(s, "stop")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= backend.vocab_size:
                raise ApiError(400, f"logit_bias key {key!r} is not a token id in [0, {backend.vocab_size})",
                               param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias value {value} of token {key} is outside [-100, 100]",
                               param="logit_bias")
            bias[int(key)] = float(value)
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, stop=stop, seed=req.seed,
            logprobs=getattr(req, "logprobs", None), frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty, logit_bias=bias)

    def submit(prompt_ids: list[list[int]], params: SamplingParams, n: int) -> tuple[list[Sequence], asyncio.Queue]:
        """Admit n sequences per prompt (choice index prompt * n + j, seed + j); their events' queue."""
        if len(prompt_ids) * n > cfg.max_concurrency:
            raise ApiError(400, f"{len(prompt_ids)} prompts x n={n} exceeds the server's max_concurrency "
                                f"of {cfg.max_concurrency} sequences", param="prompt")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        seqs = [Sequence(i * n + j, ids, params if params.seed is None else replace(params, seed=params.seed + j),
                         tokenizer, deliver, backend.vocab_size)
                for i, ids in enumerate(prompt_ids) for j in range(n)]
        if params.max_tokens > 0:
            admit(engine.submit, seqs)
        return seqs, events

    def usage(prompt_ids: list[list[int]], seqs: list[Sequence], n: int) -> dict:  # once they finished
        prompt = n * sum(len(p) for p in prompt_ids)
        completion = sum(s.n_generated for s in seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = validate(CompletionRequest, parse_json(await read_body(request, cfg.max_body_bytes)))
        check_model(req.model)
        if req.best_of is not None and req.best_of != req.n:
            raise ApiError(400, "best_of is not supported (generate n choices and rank them yourself)",
                           param="best_of")
        if req.suffix:
            raise ApiError(400, "suffix is not supported: this base language model continues text, it does not "
                                "insert", param="suffix")
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens must be >= 1 (0 only with echo)", param="max_tokens")
        params = sampling_params(req, max_tokens)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        prompt_ids = [encode_prompt(p, "prompt") for p in prompts]
        # echoed prompts with logprobs: the prompt tokens' own log-probabilities (a scoring pass)
        prompt_infos = [[] for _ in prompts]
        if req.echo and req.logprobs is not None:
            scores = await run_score(prompt_ids, top=req.logprobs)
            prompt_infos = [[TokenInfo(ids[0], None, None)] +
                            [TokenInfo(t, float(lp), top) for t, lp, top in zip(ids[1:], sc.logprobs, sc.top)]
                            for ids, sc in zip(prompt_ids, scores)]
        seqs, events = submit(prompt_ids, params, req.n)
        echoes = {s.index: (prompts[s.index // req.n], prompt_infos[s.index // req.n]) if req.echo else ("", [])
                  for s in seqs}
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def finish_usage() -> dict:
            return usage(prompt_ids, seqs, req.n)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_completion(events, seqs, head, finish_usage, include_usage, echoes),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await collect_completion(events, seqs, echoes)
        finally:
            for s in seqs:  # no-op for finished sequences; stops the rest if we are leaving early
                s.cancelled = True
        return JSONResponse({**head, "choices": choices, "usage": finish_usage()})

    # The engine enforces request_timeout_s itself; this backstop only fires if its worker stopped.
    stall_timeout = cfg.request_timeout_s + 10.0

    async def next_event(events: asyncio.Queue[Event]) -> Event:
        try:
            return await asyncio.wait_for(events.get(), stall_timeout)
        except asyncio.TimeoutError:
            raise ApiError(500, "the engine stopped producing tokens", "server_error") from None

    def logprobs_block(tokens: list[TokenInfo], text_start: int) -> dict:
        """OpenAI's legacy logprobs object for some tokens (an echoed prompt's first has no log p)."""
        strings = [tokenizer.decode([t.token_id]) for t in tokens]
        offsets, pos = [], text_start
        for s in strings:
            offsets.append(pos)
            pos += len(s)
        tops: list[dict | None] = []
        for t in tokens:
            top: dict[str, float] = {}
            for tid, lp in t.top or ():
                top.setdefault(tokenizer.decode([tid]), lp)  # distinct ids can share a string (partial UTF-8)
            tops.append(None if t.top is None else top)
        return {"tokens": strings, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
                "text_offset": offsets}

    async def collect(events: asyncio.Queue[Event], seqs: list[Sequence]) -> tuple[dict, dict, dict]:
        """Every sequence's text, tokens and finish reason, once all have finished."""
        texts: dict[int, list[str]] = {s.index: [] for s in seqs}
        tokens: dict[int, list[TokenInfo]] = {s.index: [] for s in seqs}
        finish: dict[int, str] = {} if seqs and seqs[0].params.max_tokens else {s.index: "length" for s in seqs}
        while len(finish) < len(seqs):
            event = await next_event(events)
            if event.error is not None:
                raise event.error
            texts[event.index].append(event.text)
            tokens[event.index].extend(event.tokens)
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
        return {i: "".join(t) for i, t in texts.items()}, tokens, finish

    async def collect_completion(events: asyncio.Queue[Event], seqs: list[Sequence], echoes: dict) -> list[dict]:
        texts, tokens, finish = await collect(events, seqs)
        want_logprobs = seqs[0].params.logprobs is not None
        return [{"index": s.index, "text": echoes[s.index][0] + texts[s.index],
                 "logprobs": logprobs_block(echoes[s.index][1] + tokens[s.index], 0) if want_logprobs else None,
                 "finish_reason": finish[s.index]} for s in seqs]

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def stream_events(events: asyncio.Queue[Event], seqs: list[Sequence], endpoint: str,
                            head_events: list[Event]) -> AsyncIterator[Event | ApiError]:
        """``head_events`` (echoed prompts), then each sequence's events until all have finished; a
        failure ends the stream as an ApiError. The sequences are cancelled when the client leaves."""
        running = {s.index for s in seqs} if seqs and seqs[0].params.max_tokens else set()
        try:
            for event in head_events:
                yield event
            while running:
                try:
                    event = await next_event(events)
                except ApiError as e:
                    event = Event(-1, error=e)
                if event.error is not None:
                    # Headers (200) are already sent: report in-band, as OpenAI does, and end the stream.
                    metrics.errors.labels(endpoint, str(event.error.status)).inc()
                    yield event.error
                    return
                if event.finish_reason is not None:
                    running.discard(event.index)
                yield event
        finally:  # also runs when the client disconnects: free the batch slots
            for s in seqs:
                s.cancelled = True

    async def stream_completion(events: asyncio.Queue[Event], seqs: list[Sequence], head: dict, usage: Any,
                                include_usage: bool, echoes: dict) -> AsyncIterator[str]:
        offsets = {s.index: 0 for s in seqs}
        want_logprobs = seqs[0].params.logprobs is not None
        generating = seqs[0].params.max_tokens > 0
        echoed = [Event(s.index, echoes[s.index][0], echoes[s.index][1], None if generating else "length")
                  for s in seqs if echoes[s.index][0] or not generating]
        async for event in stream_events(events, seqs, "/v1/completions", echoed):
            if isinstance(event, ApiError):
                yield sse(event.body())
                return
            if not event.text and event.finish_reason is None and not (want_logprobs and event.tokens):
                continue
            lp = logprobs_block(event.tokens, offsets[event.index]) if want_logprobs else None
            offsets[event.index] += len(event.text)
            yield sse({**head, "choices": [{"index": event.index, "text": event.text, "logprobs": lp,
                                            "finish_reason": event.finish_reason}]})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_body(request, cfg.max_body_bytes)
        if chat_template is None:
            raise ApiError(400, f"{model_name} is a base language model without a chat template: send text to "
                                f"/v1/completions, or start the server with --chat-template FILE",
                           code="chat_template_missing")
        req: ChatRequest = validate(ChatRequest, parse_json(body))
        check_model(req.model)
        for m in req.messages:
            check_text(m.content, "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
        params = sampling_params(req, max_tokens)
        prompt_ids = [encode_prompt(chat_template.render([m.model_dump() for m in req.messages]), "messages")]
        seqs, events = submit(prompt_ids, params, req.n)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_chat(events, seqs, head, lambda: usage(prompt_ids, seqs, req.n),
                                                 include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            texts, _, finish = await collect(events, seqs)
        finally:
            for s in seqs:
                s.cancelled = True
        choices = [{"index": s.index, "message": {"role": "assistant", "content": texts[s.index]},
                    "finish_reason": finish[s.index]} for s in seqs]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": usage(prompt_ids, seqs, req.n)})

    async def stream_chat(events: asyncio.Queue[Event], seqs: list[Sequence], head: dict, usage: Any,
                          include_usage: bool) -> AsyncIterator[str]:
        chunk = {**head, "object": "chat.completion.chunk"}
        for s in seqs:
            yield sse({**chunk, "choices": [{"index": s.index, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
        async for event in stream_events(events, seqs, "/v1/chat/completions", []):
            if isinstance(event, ApiError):
                yield sse(event.body())
                return
            if event.text or event.finish_reason is not None:
                delta = {"content": event.text} if event.text else {}
                yield sse({**chunk, "choices": [{"index": event.index, "delta": delta,
                                                 "finish_reason": event.finish_reason}]})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage()})
        yield "data: [DONE]\n\n"

    async def run_score(sequences: list[list[int]], top: int = 0) -> list[TokenScores]:
        """Score on the engine's thread (between decode steps); each sequence's TokenScores."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def done(value: Any) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(lambda: result.done() or result.set_result(value))

        admit(engine.submit_score, ScoreJob(sequences, done, top))
        try:
            value = await asyncio.wait_for(result, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise engine.timeout_error() from None
        if isinstance(value, ApiError):
            raise value
        return value

    # ------------------------------------------------------------------ scoring
    @app.post("/v1/score")
    async def score(request: Request) -> JSONResponse:
        req: ScoreRequest = validate(ScoreRequest, parse_json(await read_body(request, cfg.max_body_bytes)))
        check_model(req.model)
        texts = [req.text] if isinstance(req.text, str) else req.text
        if len(texts) > engine.max_batch_size:
            raise ApiError(400, f"at most {engine.max_batch_size} texts per request", param="text")
        ids = []
        for text in texts:
            check_text(text, "text")
            seq = tokenizer.encode(text)
            if len(seq) < 2:
                raise ApiError(400, "text must encode to at least 2 tokens (the first one is only context)",
                               param="text")
            if len(seq) > backend.max_seq_len:
                raise ApiError(400, f"text has {len(seq)} tokens, more than this model's max_seq_len of "
                                    f"{backend.max_seq_len}", param="text", code="context_length_exceeded")
            ids.append(seq)
        data = []
        for i, (text, seq, scores) in enumerate(zip(texts, ids, await run_score(ids))):
            ll = float(scores.logprobs.sum())
            # The first token is context only, so its bytes are not counted against the likelihood.
            n_bytes = max(1, len(text.encode("utf-8")) - len(tokenizer.decode(seq[:1]).encode("utf-8")))
            data.append({"object": "score", "index": i, "log_likelihood": ll, "tokens": len(seq),
                         "scored_tokens": len(seq) - 1, "scored_bytes": n_bytes,
                         "bits_per_token": -ll / math.log(2) / (len(seq) - 1),
                         "bits_per_byte": -ll / math.log(2) / n_bytes})
        return JSONResponse({"object": "list", "model": model_name, "data": data})

    return app

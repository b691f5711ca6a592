"""The HTTP API: an OpenAI-compatible completions endpoint plus scoring, health and Prometheus metrics.

    POST /v1/completions   prompt (string or list) → completions, plain JSON or server-sent events
    POST /v1/score         text (string or list) → log-likelihood, bits per token and per byte
    GET  /v1/models        the one model this server serves
    GET  /health           200 {"status": "ok"}; 503 while draining or if the engine died
    GET  /metrics          Prometheus text

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
from reformer_dist.serve.backends import Backend
from reformer_dist.serve.config import ServeConfig
from reformer_dist.serve.engine import Draining, Engine, Event, Overloaded, ScoreJob, Sequence
from reformer_dist.serve.metrics import ServerMetrics
from reformer_dist.serve.protocol import (
    ApiError,
    CompletionRequest,
    ScoreRequest,
    check_text,
    parse_json,
    validate,
)
from reformer_dist.serve.sampling import SamplingParams

log = logging.getLogger("reformer_dist.serve")

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the completions API
ENDPOINTS = ("/v1/completions", "/v1/score", "/v1/models", "/health", "/metrics")


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


def create_app(backend: Backend, tokenizer: Tokenizer, cfg: ServeConfig, model_name: str,
               eos_token_id: int | None = None) -> FastAPI:
    """The server's ASGI app. Its lifespan starts the engine's worker thread and, at shutdown (after
    uvicorn has let in-flight requests finish), stops it."""
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
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = validate(CompletionRequest, parse_json(await read_body(request, cfg.max_body_bytes)))
        check_model(req.model)
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if max_tokens > cfg.max_tokens_cap:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's cap of {cfg.max_tokens_cap}",
                           param="max_tokens")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        for s in stop:
            check_text(s, "stop")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) * req.n > cfg.max_concurrency:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} exceeds the server's max_concurrency "
                                f"of {cfg.max_concurrency} sequences", param="prompt")
        prompt_ids = [encode_prompt(p, "prompt") for p in prompts]
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=stop, seed=req.seed, logprobs=req.logprobs)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        seqs = [Sequence(i * req.n + j, ids,
                         params if params.seed is None else replace(params, seed=params.seed + j),
                         tokenizer, deliver)
                for i, ids in enumerate(prompt_ids) for j in range(req.n)]
        admit(engine.submit, seqs)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def usage() -> dict:  # read once the sequences have finished
            prompt, completion = sum(len(p) for p in prompt_ids), sum(s.n_generated for s in seqs)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_completion(events, seqs, head, usage, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await collect_completion(events, seqs)
        finally:
            for s in seqs:  # no-op for finished sequences; stops the rest if we are leaving early
                s.cancelled = True
        return JSONResponse({**head, "choices": choices, "usage": usage()})

    # The engine enforces request_timeout_s itself; this backstop only fires if its worker stopped.
    stall_timeout = cfg.request_timeout_s + 10.0

    async def next_event(events: asyncio.Queue[Event]) -> Event:
        try:
            return await asyncio.wait_for(events.get(), stall_timeout)
        except asyncio.TimeoutError:
            raise ApiError(500, "the engine stopped producing tokens", "server_error") from None

    def logprobs_block(tokens: list, text_start: int) -> dict:
        """OpenAI's legacy logprobs object for some generated tokens."""
        strings = [tokenizer.decode([t.token_id]) for t in tokens]
        offsets, pos = [], text_start
        for s in strings:
            offsets.append(pos)
            pos += len(s)
        tops = []
        for t in tokens:
            top: dict[str, float] = {}
            for tid, lp in t.top:
                top.setdefault(tokenizer.decode([tid]), lp)  # distinct ids can share a string (partial UTF-8)
            tops.append(top)
        return {"tokens": strings, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": tops,
                "text_offset": offsets}

    async def collect_completion(events: asyncio.Queue[Event], seqs: list[Sequence]) -> list[dict]:
        texts = {s.index: [] for s in seqs}
        tokens = {s.index: [] for s in seqs}
        finish: dict[int, str] = {}
        while len(finish) < len(seqs):
            event = await next_event(events)
            if event.error is not None:
                raise event.error
            texts[event.index].append(event.text)
            tokens[event.index].extend(event.tokens)
            if event.finish_reason is not None:
                finish[event.index] = event.finish_reason
        want_logprobs = seqs[0].params.logprobs is not None
        return [{"index": s.index, "text": "".join(texts[s.index]),
                 "logprobs": logprobs_block(tokens[s.index], 0) if want_logprobs else None,
                 "finish_reason": finish[s.index]} for s in seqs]

    async def stream_completion(events: asyncio.Queue[Event], seqs: list[Sequence], head: dict, usage: Any,
                                include_usage: bool) -> AsyncIterator[str]:
        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        offsets = {s.index: 0 for s in seqs}
        running = {s.index for s in seqs}
        want_logprobs = seqs[0].params.logprobs is not None
        try:
            while running:
                try:
                    event = await next_event(events)
                except ApiError as e:
                    event = Event(-1, error=e)
                if event.error is not None:
                    # Headers (200) are already sent: report in-band, as OpenAI does, and end the stream.
                    metrics.errors.labels("/v1/completions", str(event.error.status)).inc()
                    yield sse(event.error.body())
                    return
                if not event.text and event.finish_reason is None and not (want_logprobs and event.tokens):
                    continue
                lp = logprobs_block(event.tokens, offsets[event.index]) if want_logprobs else None
                offsets[event.index] += len(event.text)
                yield sse({**head, "choices": [{"index": event.index, "text": event.text, "logprobs": lp,
                                                "finish_reason": event.finish_reason}]})
                if event.finish_reason is not None:
                    running.discard(event.index)
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage()})
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects: free the batch slots
            for s in seqs:
                s.cancelled = True

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

        loop = asyncio.get_running_loop()
        result: asyncio.Future = loop.create_future()

        def done(value: Any) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(lambda: result.done() or result.set_result(value))

        admit(engine.submit_score, ScoreJob(ids, done))
        try:
            value = await asyncio.wait_for(result, cfg.request_timeout_s)
        except asyncio.TimeoutError:
            raise engine.timeout_error() from None
        if isinstance(value, ApiError):
            raise value
        data = []
        for i, (text, seq, logp) in enumerate(zip(texts, ids, value)):
            ll = float(logp.sum())
            # The first token is context only, so its bytes are not counted against the likelihood.
            n_bytes = max(1, len(text.encode("utf-8")) - len(tokenizer.decode(seq[:1]).encode("utf-8")))
            data.append({"object": "score", "index": i, "log_likelihood": ll, "tokens": len(seq),
                         "scored_tokens": len(seq) - 1, "scored_bytes": n_bytes,
                         "bits_per_token": -ll / math.log(2) / (len(seq) - 1),
                         "bits_per_byte": -ll / math.log(2) / n_bytes})
        return JSONResponse({"object": "list", "model": model_name, "data": data})

    return app

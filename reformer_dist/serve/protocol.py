"""The HTTP API's request schemas and error shape (OpenAI-compatible).

Requests are validated strictly: wrong types are not coerced (``"max_tokens": "5"`` is an error),
unknown fields are rejected (a misspelt ``temprature`` must not silently sample at temperature 1), and
NaN/Infinity are refused. Every failure becomes an :class:`ApiError`, answered as OpenAI does::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered to the client: HTTP status plus the OpenAI error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the token usage before ``[DONE]``."""


class _Sampling(_Strict):
    """The generation fields completions and chat requests share (OpenAI's; ``top_k`` is an extension)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=16)
    user: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (a decimal string, as JSON keys are) -> bias in [-100, 100] added to its logit."""


class CompletionRequest(_Sampling):
    """``POST /v1/completions``, OpenAI's legacy completions API. ``best_of`` > ``n`` and ``suffix`` are
    refused by the endpoint with a 400 naming them (a base LM that continues text cannot insert, and
    ranking samples is left to the client)."""

    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    """0 only with echo (the prompt's log-probabilities alone)."""
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    """Prefix each choice's text (and logprobs) with its prompt."""
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``, answered only when the server has a chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class ScoreRequest(_Strict):
    """``POST /v1/score``: the log-likelihood of each text under the model."""

    model: str | None = None
    text: str | list[str] = Field(min_length=1)


def parse_json(body: bytes) -> Any:
    """Decode a request body: strict UTF-8, standard JSON only (no NaN/Infinity). Raises ApiError(400)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None

    def refuse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=refuse_constant)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, over-long integers, NaN/Infinity
        raise ApiError(400, f"request body is not valid JSON: {e}") from None


def validate(schema: type[BaseModel], data: Any) -> Any:
    """``schema`` filled from parsed JSON; the first validation problem becomes an ApiError(400)."""
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # Report the top-level field: deeper locations name union members ('prompt', 'list[str]', 1).
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"Unrecognized request argument supplied: {err['loc'][-1]}", param=param) from None
        raise ApiError(400, f"{param}: {err['msg']}", param=param) from None


def check_text(value: str, param: str) -> None:
    """JSON can carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them up front."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} contains an unpaired UTF-16 surrogate", param=param) from None

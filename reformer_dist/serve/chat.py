"""Chat templates: how ``/v1/chat/completions`` turns messages into a prompt for a base language model.

A Reformer trained here is a base LM: it continues text. A chat endpoint makes sense only with a
template that lays the messages out as the model was trained to read them, so the server answers chat
requests only when started with ``--chat-template FILE`` (otherwise a 400 that says so). The file is a
Jinja2 template in Hugging Face's chat-template convention: it sees ``messages`` (dicts with ``role`` and
``content``) and ``add_generation_prompt`` (always true here) and may call ``raise_exception(message)``.
It is rendered in Jinja2's immutable sandbox (as transformers does), so a template cannot reach Python.
"""

from __future__ import annotations

import os

from reformer_dist.errors import ReformerDistError
from reformer_dist.serve.protocol import ApiError


class ChatTemplate:
    def __init__(self, source: str, name: str = "<template>"):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ReformerDistError(f"{name}: not a valid Jinja2 chat template ({e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> ChatTemplate:
        try:
            with open(path, encoding="utf-8") as f:
                return cls(f.read(), str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise ReformerDistError(f"{path}: cannot read the chat template ({e})") from None

    def render(self, messages: list[dict]) -> str:
        """The prompt for ``messages``; a template's own refusal becomes a 400 naming ``messages``."""
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True)
        except TemplateError as e:
            raise ApiError(400, f"the chat template refused these messages: {e}", param="messages") from None

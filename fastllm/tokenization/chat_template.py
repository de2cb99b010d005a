"""Render chat messages with the model's own jinja template, as transformers does.

Templates come from ``chat_template.jinja`` or ``tokenizer_config.json``. Models without one get
the seed's plain ``role: content`` lines. The environment mirrors transformers'
(sandboxed, trim_blocks, lstrip_blocks, ``raise_exception``, ``strftime_now``, a non-ASCII-safe
``tojson``) so that templates written for ``apply_chat_template`` render identically.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from fastllm.errors import InvalidRequestError, ModelLoadError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class TemplateError(InvalidRequestError):
    """The template itself refused the conversation (``raise_exception`` in the template)."""


def _raise(message: str) -> None:
    raise TemplateError(message, param="messages")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        from jinja2 import TemplateError as JinjaError
        from jinja2 import meta
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
            # Templates that render tools themselves read a `tools` variable (Qwen2.5, Llama 3.x, Mistral...).
            self.renders_tools = "tools" in meta.find_undeclared_variables(env.parse(source))
        except JinjaError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from None
        self.source = source
        self._special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    @classmethod
    def for_model(cls, folder: Path, config: dict[str, Any], *, bos_token: str | None,
                  eos_token: str | None) -> ChatTemplate:
        jinja_file = folder / "chat_template.jinja"
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if jinja_file.is_file():
            source = jinja_file.read_text()
        return cls(source or FALLBACK_TEMPLATE, bos_token=bos_token, eos_token=eos_token)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, variables: dict[str, Any] | None = None) -> str:
        """``tools`` as transformers passes them: OpenAI's ``{"type": "function", "function": {...}}`` entries,
        given to the template only when there are some (templates test ``tools is defined`` as well as truth).
        ``variables``: a request's ``chat_template_kwargs`` (Qwen3's ``enable_thinking``), as
        ``apply_chat_template(**kwargs)`` passes them; they cannot replace what the server sets itself."""
        from jinja2 import TemplateError as JinjaError

        reserved = sorted(set(variables or {}) & {"messages", "add_generation_prompt", "tools", *self._special})
        if reserved:
            raise InvalidRequestError(f"chat_template_kwargs cannot set {', '.join(reserved)}",
                                      param="chat_template_kwargs")
        extra = {**(variables or {}), **({"tools": tools} if tools else {})}
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._special, **extra
            )
        except TemplateError:
            raise
        except JinjaError as exc:
            raise InvalidRequestError(f"the chat template failed on these messages: {exc}",
                                      param="messages") from None

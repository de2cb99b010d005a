"""Tool calls in each model family's own syntax: how the prompt offers them, how a grammar enforces them,
and how the generated text is read back into OpenAI's ``tool_calls``.

The syntax comes from the model's chat template (what its template writes for an assistant's tool
calls is what the model was trained to write), never from the model's name:

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call
  (Qwen2.5, Qwen3, Hermes and most templates that render tools).
- ``mistral``: ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``, every call in one array.
- ``llama3_json``: the whole answer is ``{"name": ..., "parameters": {...}}`` (Llama 3.1-3.3), calls
  separated by ``;``.
- ``fallback``: for templates that know nothing of tools (SmolLM2): the Hermes form, with the tool list
  and instructions written into the system prompt by FastLLM.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fastllm.runtime.grammar import JSON_OPTIONS


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI sends it: a string


@dataclass(frozen=True)
class ToolCallSyntax:
    name: str
    start: str  # what opens calls anywhere in the answer; "" for llama3_json, whose answer is the bare JSON
    end: str  # what closes each call ("" where the JSON's own end does)
    args_key: str  # "arguments", or "parameters" for Llama 3
    array: bool = False  # all calls in one JSON array after ``start`` (Mistral)
    separator: str = "\n"  # between two calls
    native: bool = True  # the template renders tools itself; else the server describes them in the prompt
    # Openers also taken for a call where the answer begins with them (then only there), with their closers:
    # small models asked for `<tool_call>` often answer with a fenced or bare JSON call instead, which
    # llama.cpp reads as a call too. "" is the bare JSON object.
    leading: tuple[tuple[str, str], ...] = ()

    def call_schema(self, tools: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The JSON schema of one call to any of ``tools`` (OpenAI function definitions)."""
        variants = [
            {"type": "object",
             "properties": {"name": {"const": tool["name"]},
                            self.args_key: tool.get("parameters") or {"type": "object"}},
             "required": ["name", self.args_key], "additionalProperties": False}
            for tool in tools
        ]
        return {**(variants[0] if len(variants) == 1 else {"anyOf": variants}), "x-guidance": JSON_OPTIONS}

    def lark(self, tools: Sequence[dict[str, Any]], *, choice: str, parallel: bool, start_token: int | None,
             answer: str | None = None) -> str:
        """An llguidance Lark grammar for a tool ``choice``:

        - ``required``: calls only;
        - ``auto``: an answer (free text, or the rule ``answer``), each call constrained from the moment the
          model opens one, as llama.cpp's lazy grammars do;
        - ``none``: an answer that does not open a call (small models imitate the calls in their history).

        ``start_token`` is the id of ``start`` where it is a special token (written ``<[id]>``), which free
        text can never produce."""
        schema = self.call_schema(tools)
        one = f"%json {json.dumps(schema)}"
        opener = f"<[{start_token}]>" if start_token is not None else json.dumps(self.start)
        leading = () if choice == "required" or answer else self.leading
        # Free text may not begin like a call, or that call would never be enforced (or, with none, be made).
        banned = [lead.rstrip() or "{" for lead, _ in leading]  # "```json" bans "```jsonrpc" too
        if choice == "none" and self.start and start_token is None:
            banned.append(self.start)
        text = "/(?s:.*)/" + (f" & ~/({'|'.join(map(_regex, banned))})(?s:.*)/" if banned else "")
        rules = ["%llguidance {}", f"TEXT: {text}"]
        if choice == "none":
            return "\n".join([*rules, f"start: {answer or 'TEXT'}"]) + "\n"
        separated = f"({json.dumps(self.separator)} {one})*" if parallel else ""
        forms = [f"{_literal(lead)} {one} {_literal(close)}" if lead else f"{one} {'' if self.start else separated}"
                 for lead, close in leading]
        if self.array:
            items = {"type": "array", "items": schema, "minItems": 1, **({} if parallel else {"maxItems": 1}),
                     "x-guidance": JSON_OPTIONS}
            calls = f'{opener} " " %json {json.dumps(items)}'
            forms.append(calls)
        elif not self.start:  # bare JSON: the calls are the leading form itself
            calls = f"{one} {separated}"
        else:
            block = f'"\\n" {one} "\\n" {json.dumps(self.end)}'
            more = f"({json.dumps(self.separator)} {opener} {block})*" if parallel else ""
            calls = f"{opener} {block} {more}"
            if start_token is not None:  # free text cannot hold a special token: no laziness needed
                forms.append(f"TEXT {calls}")
            elif choice == "auto":  # a lazy lexeme: free text that ends as soon as the opener appears
                rules.append(f"text_then_open[lazy]: TEXT {opener}")
                forms.append(f"text_then_open {block} {more}")
        if choice == "required":
            return "\n".join([*rules, f"start: {calls}"]) + "\n"
        return "\n".join([*rules, "start: " + " | ".join([answer or "TEXT", *forms])]) + "\n"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content before the calls and the calls, from a finished answer: what streaming it gives."""
        stream = ToolCallStream(self)
        content, deltas = stream.feed(text)
        tail, more = stream.finish()
        calls: list[ToolCall] = []
        for delta in deltas + more:
            if delta.id is not None:
                calls.append(ToolCall(delta.id, delta.name or "", delta.arguments))
            else:
                calls[-1] = replace(calls[-1], arguments=calls[-1].arguments + delta.arguments)
        if not calls:
            return text, []
        return (content + tail or None), calls


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""


def _regex(text: str) -> str:
    """``text`` as a literal inside llguidance's ``/.../``."""
    return "".join("\\n" if c == "\n" else f"\\{c}" if c in ".^$*+?()[]{}|\\/" else c for c in text)


_FENCED_OR_BARE = (("```json\n", "\n```"), ("", ""))
HERMES = ToolCallSyntax("hermes", "<tool_call>", "</tool_call>", "arguments", leading=_FENCED_OR_BARE)
MISTRAL = ToolCallSyntax("mistral", "[TOOL_CALLS]", "", "arguments", array=True)
LLAMA3_JSON = ToolCallSyntax("llama3_json", "", "", "parameters", separator="; ", leading=(("", ""),))
FALLBACK = replace(HERMES, name="fallback", native=False)
SYNTAXES = {s.name: s for s in (HERMES, MISTRAL, LLAMA3_JSON, FALLBACK)}


def detect_syntax(template: str, *, renders_tools: bool, override: str = "auto") -> ToolCallSyntax:
    """The syntax a chat template trains its model to call tools with (or the configured one)."""
    if override != "auto":
        return SYNTAXES[override]
    if not renders_tools:
        return FALLBACK
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<tool_call>" in template:
        return HERMES
    if "<|start_header_id|>" in template and '"parameters": ' in template:
        return LLAMA3_JSON
    return FALLBACK


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class CallDelta:
    """A piece of a call as it streams: the first of each call carries its id and name, the next ones its
    arguments' text, as the model writes it."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


# The start of a call object, up to its arguments: from here the arguments stream as they are written.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class ToolCallStream:
    """Reads generated text as it streams: content is released as soon as it cannot be the start of a call
    (trailing whitespace waits, since a call may follow it); a call's name as soon as it is written, then its
    arguments as they come."""

    def __init__(self, syntax: ToolCallSyntax) -> None:
        self.syntax = syntax
        self._pending = ""
        self._closer: str | None = None  # set once a call is open: what ends each call ("" = the JSON's end)
        self._opener = syntax.start
        self._leading = syntax.leading  # where the answer begins with one of these, it is a call
        self._began = False  # the answer has begun as content
        self._calls_seen = 0
        self._arguments: _ArgumentsScanner | None = None  # inside a call's arguments

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        self._pending += text
        content = "" if self._closer is not None else self._content()
        return content, self._calls() if self._closer is not None else []

    def finish(self) -> tuple[str, list[CallDelta]]:
        if self._closer is None:
            rest, self._pending = self._pending, ""
            return rest, []
        calls = self._calls(final=True)
        rest, self._pending = self._pending, ""
        if rest.strip() and not calls and not self._calls_seen:  # a lone call that never parsed: left as text
            return self._opener + rest, calls
        return "", calls

    def _open(self, opener: str, closer: str, rest: str) -> None:
        self._opener, self._closer, self._pending = opener, closer, rest

    def _content(self) -> str:
        text = self._pending
        if not self._began and self._leading:
            stripped = text.lstrip()
            for lead, close in self._leading:
                if stripped.startswith(lead or "{"):
                    self._open(lead, close, stripped[len(lead):])
                    return ""
            if not stripped or any(lead.startswith(stripped) for lead, _ in self._leading):
                return ""  # too early to tell
        self._began = True
        start = self.syntax.start
        if not start:
            self._pending = ""
            return text
        at = text.find(start)
        if at != -1:
            self._open(start, self.syntax.end, text[at + len(start):])
            return text[:at].rstrip()
        keep = next((n for n in range(min(len(start) - 1, len(text)), 0, -1) if start.startswith(text[-n:])), 0)
        body, held = text[: len(text) - keep], text[len(text) - keep:]
        stripped = body.rstrip()
        self._pending = body[len(stripped):] + held
        return stripped

    def _calls(self, final: bool = False) -> list[CallDelta]:
        out: list[CallDelta] = []
        while True:
            if self._arguments is None:
                text = self._pending.lstrip().removeprefix(self._opener).lstrip(" ;\n")
                head = None if self.syntax.array else _HEAD.match(text)
                if head is not None:
                    out.append(CallDelta(self._calls_seen, new_call_id(), json.loads(head.group(1))))
                    self._arguments, self._pending = _ArgumentsScanner(), text[head.end():]
                    continue
                whole = self._whole_calls(text, final)  # Mistral's array, or keys in another order
                if whole is None:
                    return out
                for call in whole:
                    out += [CallDelta(self._calls_seen, call.id, call.name), CallDelta(self._calls_seen,
                                                                                     arguments=call.arguments)]
                    self._calls_seen += 1
                continue
            if not self._arguments.done:
                piece, used = self._arguments.scan(self._pending)
                self._pending = self._pending[used:]
                if piece:
                    out.append(CallDelta(self._calls_seen, arguments=piece))
                if not self._arguments.done:
                    return out
            rest = self._close(self._pending.lstrip().removeprefix("}") if self._pending.lstrip().startswith("}")
                               else None if not final else self._pending, final)
            if rest is None:
                return out
            self._pending, self._arguments = rest, None
            self._calls_seen += 1

    def _close(self, after: str | None, final: bool) -> str | None:
        """What follows a call once its closer is past; None while the closer may still be coming."""
        if after is None:
            return None
        if self._closer:
            text = after.lstrip()
            if text.startswith(self._closer):
                return text[len(self._closer):]
            if not final and self._closer.startswith(text):
                return None
        return after

    def _whole_calls(self, text: str, final: bool) -> list[ToolCall] | None:
        try:
            value, used = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError:
            return None
        found = _calls_in(value, self.syntax.args_key)
        rest = self._close(text[used:], final) if found is not None else None
        if rest is None:
            return None
        self._pending = rest
        return found


class _ArgumentsScanner:
    """Finds where a JSON value ends in text that arrives in pieces. An object is passed on as written; a
    JSON string holding an object (some models write that) is passed on once complete, as the object."""

    def __init__(self) -> None:
        self.done = False
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._started = False

    def scan(self, text: str) -> tuple[str, int]:
        """(the value's text found in ``text``, characters of ``text`` used)."""
        skipped = len(text) - len(text.lstrip())
        if not self._started:
            if not text.strip():
                return "", len(text)
            if not text.lstrip().startswith("{"):
                try:
                    value, used = json.JSONDecoder().raw_decode(text.lstrip())
                except json.JSONDecodeError:
                    return "", 0
                self.done = True
                if isinstance(value, str):
                    with contextlib.suppress(json.JSONDecodeError):
                        value = json.loads(value)
                return json.dumps(value, ensure_ascii=False), skipped + used
            self._started, text = True, text.lstrip()
        else:
            skipped = 0
        for i, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return text[: i + 1], skipped + i + 1
        return text, skipped + len(text)


def _calls_in(value: Any, args_key: str) -> list[ToolCall] | None:
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get(args_key, item.get("arguments", item.get("parameters", {})))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string already
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        calls.append(ToolCall(new_call_id(), item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def fallback_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """What a template without tool support is told, in the Hermes form that ``FALLBACK`` parses."""
    listed = "\n".join(json.dumps({"type": "function", "function": tool}, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to help with the user's request. The functions are "
        f"described in JSON within <tools></tools> tags:\n<tools>\n{listed}\n</tools>\n\n"
        "To call a function, answer with a JSON object holding its name and arguments within "
        "<tool_call></tool_call> tags, one block per call:\n<tool_call>\n"
        '{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>\n'
        "Function results come back within <tool_response></tool_response> tags."
    )


def call_text(syntax: ToolCallSyntax, calls: Sequence[dict[str, Any]]) -> str:
    """Earlier calls written back the way the model writes them (for templates that cannot)."""
    blocks = [json.dumps({"name": c["function"]["name"], syntax.args_key: c["function"]["arguments"]},
                         ensure_ascii=False) for c in calls]
    if syntax.array:
        return f"{syntax.start} [{', '.join(blocks)}]"
    if not syntax.start:
        return syntax.separator.join(blocks)
    return syntax.separator.join(f"{syntax.start}\n{b}\n{syntax.end}" for b in blocks)

"""What a request constrains its output to: ``response_format``, ``structured_outputs`` and ``tools`` /
``tool_choice`` all become one llguidance grammar, compiled (or found in the model's cache) off the event
loop before the request reaches the engine.

Every problem is the client's, so each one is a 400 naming the field: two constraints at once where they
cannot combine, a tool choice naming no offered tool, a schema or grammar llguidance cannot enforce.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from fastllm.errors import InvalidRequestError
from fastllm.runtime.grammar import CompiledGrammar, Grammar, json_schema_grammar, lark_grammar, regex_grammar
from fastllm.runtime.models import ServedModel
from fastllm.server.schemas import ChatCompletionRequest, NamedToolChoice, _SamplingFields
from fastllm.tokenization.tool_calls import ToolCallSyntax


@dataclass(frozen=True)
class ToolPlan:
    """The tools a chat request offers and how its model writes calls to them."""

    tools: list[dict[str, Any]]  # OpenAI function definitions: name, description, parameters
    syntax: ToolCallSyntax
    choice: Literal["none", "auto", "required"]  # a named function is "required" with that tool alone
    parallel: bool
    start_token: int | None  # the syntax's opener where it is one special token (decoding must keep it)

    @property
    def calls(self) -> bool:
        """Whether the answer may hold calls (and is read back for them)."""
        return self.choice != "none"


def output_grammar(body: _SamplingFields) -> Grammar | None:
    """The grammar of the answer itself: ``response_format`` (OpenAI) or ``structured_outputs`` (vLLM's name)."""
    outputs, response = body.structured_outputs, body.response_format
    if outputs is not None:
        if response is not None and response.type != "text":
            raise InvalidRequestError("send either response_format or structured_outputs, not both",
                                      param="structured_outputs")
        given = {key: value for key in ("json", "regex", "grammar", "choice")
                 if (value := getattr(outputs, key)) is not None}
        if len(given) != 1:
            raise InvalidRequestError("structured_outputs takes exactly one of json, regex, grammar or choice",
                                      param="structured_outputs")
        (kind, value), = given.items()
        param = f"structured_outputs.{kind}"
        if kind == "json":
            return json_schema_grammar(value, param)
        if kind == "regex":
            return regex_grammar(value, param)
        if kind == "grammar":
            return lark_grammar(value, param)
        return lark_grammar("start: " + " | ".join(json.dumps(option) for option in value), param)
    if response is None or response.type == "text":
        return None
    if response.type == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    if response.json_schema is None:
        raise InvalidRequestError("response_format of type json_schema needs its json_schema object",
                                  param="response_format.json_schema")
    schema = response.json_schema.json_schema
    return json_schema_grammar({} if schema is None else schema, "response_format")


def tool_plan(model: ServedModel, body: ChatCompletionRequest) -> ToolPlan | None:
    """The tools offered in this request and what may be done with them; None where none are offered."""
    tools = [function_dict(tool.function) for tool in body.tools or []]
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise InvalidRequestError("tool_choice needs tools to choose from", param="tool_choice")
    if not tools:
        return None
    names = [tool["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise InvalidRequestError("two tools have the same name", param="tools")
    if isinstance(choice, NamedToolChoice):
        chosen = choice.function.name
        if chosen not in names:
            raise InvalidRequestError(f"tool_choice names {chosen!r}, which is not among the tools offered",
                                      param="tool_choice")
        choice, tools, parallel = "required", [t for t in tools if t["name"] == chosen], False
    else:
        parallel = body.parallel_tool_calls
    syntax = model.tool_syntax
    start_token = model.tokenizer.special_token_id(syntax.start) if syntax.start else None
    return ToolPlan(tools, syntax, choice, parallel=parallel, start_token=start_token)


def tool_grammar(model: ServedModel, plan: ToolPlan, answer: Grammar | None) -> Grammar:
    """Calls in the model's own syntax, each to an offered tool with arguments valid for its parameters;
    with ``auto``, the answer (free text, or ``answer``'s grammar) until the model opens a call; with
    ``none``, an answer that opens no call."""
    if plan.choice == "none" and answer is not None:
        return answer
    lark = plan.syntax.lark(plan.tools, choice=plan.choice, parallel=plan.parallel, start_token=plan.start_token,
                            answer=None if answer is None else "@answer")
    grammars: list[dict[str, Any]] = [{"lark_grammar": lark}]
    if answer is not None and plan.choice != "required":
        grammars.append({**json.loads(answer.text)["grammars"][0], "name": "answer"})
    return Grammar(json.dumps({"grammars": grammars}), "tools")


async def compile_grammar(model: ServedModel, grammar: Grammar) -> CompiledGrammar:
    """Compile in a worker thread (llguidance releases the GIL): a large schema never stalls other requests."""
    if model.grammars is None:  # pragma: no cover - every generation model has a compiler
        raise InvalidRequestError(f"{model.id!r} cannot constrain its output", param=grammar.param)
    return await asyncio.to_thread(model.grammars.compile, grammar)


def function_dict(function: Any) -> dict[str, Any]:
    """A function definition as the plain dict chat templates and schemas take (None fields dropped)."""
    fields = {"name": function.name, "description": function.description, "parameters": function.parameters}
    return {key: value for key, value in fields.items() if value is not None}

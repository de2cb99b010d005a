"""From a validated request body to what the engine runs: prompt ids, sampling and limits.

Everything here is a check a client can fail, so each raises a ``RequestError`` naming the field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastllm.errors import ContextLengthError, InvalidRequestError, WrongModelTypeError
from fastllm.runtime.generation import GenerationRequest
from fastllm.runtime.models import ServedModel
from fastllm.runtime.sampling import SamplingParams
from fastllm.server import constraints
from fastllm.server.constraints import ToolPlan
from fastllm.server.schemas import ChatCompletionRequest, ChatMessage, _SamplingFields
from fastllm.tokenization.tool_calls import ToolCallSyntax, call_text, fallback_system_prompt

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily


def chat_messages(messages: list[ChatMessage], syntax: ToolCallSyntax) -> list[dict[str, Any]]:
    """OpenAI messages → the plain dicts chat templates expect: text parts joined, developer = system, tool
    calls with their arguments as objects (templates write them with ``tojson``) and tool results named.
    For a template that knows nothing of tools, calls and results become text in the fallback syntax."""
    rendered: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # call id → function name, for the tool results that answer it
    for i, message in enumerate(messages):
        content = _text(message, i)
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequestError(f"messages[{i}] is a tool result without tool_call_id",
                                          param=f"messages[{i}].tool_call_id")
            entry = {"role": "tool", "content": content or "", "tool_call_id": _call_id(message.tool_call_id, syntax)}
            if name := message.name or names.get(message.tool_call_id):
                entry["name"] = name
        elif message.tool_calls:
            if message.role != "assistant":
                raise InvalidRequestError(f"messages[{i}] has tool_calls, which only assistant messages carry",
                                          param=f"messages[{i}].tool_calls")
            calls = []
            for j, call in enumerate(message.tool_calls):
                names[call.id] = call.function.name
                arguments = _arguments(call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")
                calls.append({"id": _call_id(call.id, syntax), "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            entry = {"role": "assistant", "content": content or "", "tool_calls": calls}
        else:
            entry = {"role": "system" if message.role == "developer" else message.role, "content": content or ""}
        rendered.append(entry)
    return rendered if syntax.native else _as_text(rendered, syntax)


def _text(message: ChatMessage, i: int) -> str | None:
    if not isinstance(message.content, list):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"messages[{i}].content[{j}] has type {part.type!r}; only text parts are supported",
                param=f"messages[{i}].content",
            )
        texts.append(part.text)
    return "".join(texts)


def _arguments(arguments: str, param: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{param} is not a JSON object", param=param)
    return value


def _call_id(call_id: str, syntax: ToolCallSyntax) -> str:
    """Mistral's templates refuse call ids that are not 9 letters and digits; others take ids as sent."""
    if syntax.name != "mistral" or (len(call_id) == 9 and call_id.isalnum()):
        return call_id
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def _as_text(messages: list[dict[str, Any]], syntax: ToolCallSyntax) -> list[dict[str, Any]]:
    """Calls and results as plain turns, for templates without tool support: a call is assistant text in the
    syntax the model is asked to use, consecutive results are one user turn."""
    plain: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if plain and plain[-1].get("tool_results"):
                plain[-1]["content"] += "\n" + result
            else:
                plain.append({"role": "user", "content": result, "tool_results": True})
        elif "tool_calls" in message:
            text = call_text(syntax, message["tool_calls"])
            plain.append({"role": "assistant", "content": f"{message['content']}\n{text}".lstrip("\n")})
        else:
            plain.append(message)
    return [{k: v for k, v in m.items() if k != "tool_results"} for m in plain]


def _with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fallback's tool list and instructions, appended to the system prompt (or as one)."""
    prompt = fallback_system_prompt(tools)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def check_token_ids(model: ServedModel, ids: list[int], param: str) -> None:
    limit = model.tokenizer.vocab_size
    if any(i >= limit for i in ids):
        raise InvalidRequestError(f"{param} holds token ids outside the vocabulary (0..{limit - 1})", param=param)


def build(model: ServedModel, body: _SamplingFields, prompt_ids: list[int], *, max_n: int,
          logprobs: bool, top_logprobs: int, max_tokens: int | None) -> GenerationRequest:
    if body.n > max_n:
        raise InvalidRequestError(f"n is {body.n}; this server allows at most {max_n}", param="n")
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    context = model.context_length
    room = context - len(prompt_ids)
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens if max_tokens is not None else 1
        raise ContextLengthError(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the prompt, {asked} for the completion). "
            "Please reduce the prompt or max_tokens.",
            param="max_tokens" if room > 0 else "messages",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        token = int(key) if key.isascii() and key.isdigit() and len(key) < 12 else -1  # not "²", "--1", 10**5000
        if not 0 <= token < model.tokenizer.vocab_size:
            raise InvalidRequestError(f"logit_bias key {key!r} is not a token id of this model",
                                      param="logit_bias")
        bias[token] = value
    temperature = 1.0 if body.temperature is None else body.temperature
    params = SamplingParams(
        # Dividing logits by a near-zero temperature overflows to inf (then NaN probabilities): treat it as
        # greedy, which is what it tends to, as vLLM does.
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        # Any integer is a valid seed for clients; numpy's generators take only non-negative ones.
        seed=None if body.seed is None else body.seed % 2**64,
    )
    return GenerationRequest(prompt_ids=prompt_ids, params=params, max_tokens=max_tokens or room, stop=stop,
                             n=body.n, ignore_eos=body.ignore_eos, speculative=body.speculative)


async def chat_request(model: ServedModel, body: ChatCompletionRequest,
                       max_n: int) -> tuple[GenerationRequest, ToolPlan | None]:
    """The engine's request and, where the answer may call tools, the plan it is read back with."""
    if model.chat_template is None:
        raise WrongModelTypeError(f"{model.id!r} has no chat template", param="model")
    if body.top_logprobs and not body.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    plan = constraints.tool_plan(model, body)
    calls = plan if plan is not None and plan.calls else None
    messages = chat_messages(body.messages, model.tool_syntax)
    tools = None
    if calls is not None:  # with tool_choice "none" the tools stay out of the prompt
        if calls.syntax.native:
            tools = [{"type": "function", "function": tool} for tool in calls.tools]
        else:
            messages = _with_tool_prompt(messages, calls.tools)
    prompt = model.chat_template.render(messages, add_generation_prompt=True, tools=tools,
                                         variables=body.chat_template_kwargs)
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    request = build(model, body, ids, max_n=max_n, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
                    max_tokens=body.max_completion_tokens or body.max_tokens)
    grammar = constraints.output_grammar(body)
    if plan is not None:
        grammar = constraints.tool_grammar(model, plan, grammar)
    if calls is not None:  # an opener that is a special token must survive decoding
        request.skip_special_tokens = calls.start_token is None
    if grammar is not None:
        request.grammar = await constraints.compile_grammar(model, grammar)
    return request, calls


async def completion_grammar(model: ServedModel, body: _SamplingFields, requests: list[GenerationRequest]) -> None:
    """``response_format`` / ``structured_outputs`` on the legacy endpoint: every prompt follows the grammar."""
    grammar = constraints.output_grammar(body)
    if grammar is not None:
        compiled = await constraints.compile_grammar(model, grammar)
        for request in requests:
            request.grammar = compiled


def token_lists(model: ServedModel, items: str | list[Any], param: str) -> list[list[int]]:
    """A string, strings, one token-id list or token-id lists → token-id lists (strings are encoded)."""
    if isinstance(items, str):
        items = [items]
    kinds = {type(item) for item in items}
    if len(kinds) > 1:
        raise InvalidRequestError(f"{param} mixes strings, token ids and token-id lists", param=param)
    if kinds == {int}:
        items = [items]
    lists = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequestError(f"{param}[{i}] is an empty string", param=param)
            lists.append(model.tokenizer.encode(item))
        else:
            check_token_ids(model, item, param)
            lists.append(list(item))
    return lists

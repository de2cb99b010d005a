"""POST /v1/chat/completions, plain and streamed as Server-Sent Events."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, Response, post
from litestar.response import ServerSentEvent

from fastllm.config import Settings
from fastllm.runtime.generation import Delta
from fastllm.runtime.models import ServedModel
from fastllm.runtime.sampling import TokenLogprob
from fastllm.server import requests
from fastllm.server.constraints import ToolPlan
from fastllm.server.errors import error_payload
from fastllm.server.metrics import Metrics
from fastllm.server.openapi import MODEL_ERRORS, responses, streaming
from fastllm.server.outputs import ChoiceState, accumulate, prompt_cached_tokens, request_id, run, usage
from fastllm.server.registry import ModelRegistry
from fastllm.server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from fastllm.tokenization.tool_calls import ToolCallStream

log = logging.getLogger(__name__)


def chat_logprobs(model: ServedModel, logprobs: list[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, value: float) -> TopLogprob:
        text = model.tokenizer.token_text(token_id)
        return TopLogprob(token=text, logprob=value, bytes=list(text.encode()))

    content = []
    for item in logprobs:
        text = model.tokenizer.token_text(item.token_id)
        content.append(ChatTokenLogprob(token=text, logprob=item.logprob, bytes=list(text.encode()),
                                        top_logprobs=[top(i, v) for i, v in item.top]))
    return ChatLogprobs(content=content)


class ChatController(Controller):
    path = "/v1/chat/completions"
    tags = ["chat"]

    @post(status_code=200, summary="Create a chat completion", operation_class=streaming(ChatCompletionChunk),
          responses=responses(ChatCompletion, "The completion; Server-Sent Events of chunks when `stream` is true",
                              408, *MODEL_ERRORS))
    async def create(self, data: ChatCompletionRequest, registry: ModelRegistry, settings: Settings,
                     metrics: Metrics) -> Response[bytes] | ServerSentEvent:
        model = registry.generator(data.model)
        request, plan = await requests.chat_request(model, data, settings.runtime.max_n)
        completion_id, created = request_id("chatcmpl"), int(time.time())
        deltas = run(model, request, metrics, settings.server.request_timeout, completion_id)
        if data.stream:
            first = await anext(deltas)  # errors before the first token still get a proper status
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return ServerSentEvent(_stream(model, data, plan, first, deltas, completion_id, created,
                                           len(request.prompt_ids), include_usage))
        states = [ChoiceState() for _ in range(data.n)]
        async for step in deltas:
            accumulate(states, step)
        completion_tokens = sum(s.tokens for s in states)
        body = ChatCompletion(
            id=completion_id, created=created, model=model.id,
            choices=[_choice(model, data, plan, i, s) for i, s in enumerate(states)],
            usage=usage(len(request.prompt_ids), completion_tokens, states[0].cached_tokens),
        )
        return Response(msgspec.json.encode(body), media_type="application/json")


def _choice(model: ServedModel, data: ChatCompletionRequest, plan: ToolPlan | None, index: int,
            state: ChoiceState) -> ChatChoice:
    """One finished choice; where tools were offered, its calls read out of the text."""
    content: str | None = state.text
    calls = []
    if plan is not None:
        content, found = plan.syntax.parse(state.text)
        calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in found]
    return ChatChoice(
        index=index, message=AssistantMessage(role="assistant", content=content, tool_calls=calls or None),
        finish_reason=_finish(state.finish_reason, bool(calls)),
        logprobs=chat_logprobs(model, state.logprobs) if data.logprobs else None,
    )


def _finish(reason: str | None, called: bool) -> str | None:
    """OpenAI's ``tool_calls`` where the model ended its turn by calling; a ``length`` cut stays one."""
    return "tool_calls" if called and reason == "stop" else reason


async def _stream(model: ServedModel, data: ChatCompletionRequest, plan: ToolPlan | None, first: list[Delta],
                  rest: AsyncIterator[list[Delta]], completion_id: str, created: int, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return msgspec.json.encode(ChatCompletionChunk(id=completion_id, created=created, model=model.id,
                                                       choices=choices, usage=usage))

    completion_tokens = cached_tokens = 0
    try:
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(data.n)])
        readers = [ToolCallStream(plan.syntax) for _ in range(data.n)] if plan else []
        calls_made = [0] * data.n
        step: list[Delta] | None = first
        while step is not None:
            # Each choice's parts of this step (text, then each call's header and arguments), sent as chunks
            # in order: the k-th chunk holds the k-th part of every choice that has one.
            parts: list[list[ChatChunkChoice]] = []
            cached_tokens += prompt_cached_tokens(step, data.n)
            for delta in step:
                completion_tokens += len(delta.token_ids)
                parts.append(_parts(model, data, delta, readers[delta.index] if readers else None, calls_made))
            for k in range(max((len(p) for p in parts), default=0)):
                yield chunk([p[k] for p in parts if k < len(p)])
            step = await anext(rest, None)
        if include_usage:
            yield chunk([], usage(prompt_tokens, completion_tokens, cached_tokens))
    except Exception as exc:  # headers are sent: the error travels as a final event
        log.warning("stream %s ended by error: %s", completion_id, exc)
        yield error_payload(exc)
    finally:
        await rest.aclose()  # a vanished client frees its batch slot now, not at garbage collection
    yield b"[DONE]"


def _parts(model: ServedModel, data: ChatCompletionRequest, delta: Delta, reader: ToolCallStream | None,
           calls_made: list[int]) -> list[ChatChunkChoice]:
    """One choice's step as streamed deltas. With tools, text is released only once it cannot be the start of
    a call, and each call goes out as OpenAI streams one: index, id, type and name, then its arguments in
    pieces as the model writes them."""
    text, calls = delta.text, []
    if reader is not None:
        text, calls = reader.feed(delta.text)
        if delta.finish_reason:
            tail, more = reader.finish()
            text, calls = text + tail, calls + more
    logprobs = chat_logprobs(model, delta.logprobs) if data.logprobs else None
    parts = []
    if text or (logprobs and delta.logprobs):
        parts.append(ChatChunkChoice(index=delta.index, delta=ChatDelta(content=text or None), logprobs=logprobs))
    for call in calls:
        if call.id is not None:
            calls_made[delta.index] += 1
            function = FunctionCallDelta(name=call.name, arguments=call.arguments)
            piece = ToolCallDelta(index=call.index, id=call.id, type="function", function=function)
        else:
            piece = ToolCallDelta(index=call.index, function=FunctionCallDelta(arguments=call.arguments))
        parts.append(ChatChunkChoice(index=delta.index, delta=ChatDelta(tool_calls=[piece])))
    if delta.finish_reason:
        finish = _finish(delta.finish_reason, calls_made[delta.index] > 0)
        if parts:
            parts[-1].finish_reason = finish
        else:
            parts.append(ChatChunkChoice(index=delta.index, delta=ChatDelta(), finish_reason=finish))
    return parts

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
from fastllm.server.errors import error_payload
from fastllm.server.metrics import Metrics
from fastllm.server.openapi import MODEL_ERRORS, responses, streaming
from fastllm.server.outputs import ChoiceState, accumulate, request_id, run
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
    TopLogprob,
    Usage,
)

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
        request = requests.chat_request(model, data, settings.runtime.max_n)
        completion_id, created = request_id("chatcmpl"), int(time.time())
        deltas = run(model, request, metrics, settings.server.request_timeout, completion_id)
        if data.stream:
            first = await anext(deltas)  # errors before the first token still get a proper status
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return ServerSentEvent(_stream(model, data, first, deltas, completion_id, created,
                                           len(request.prompt_ids), include_usage))
        states = [ChoiceState() for _ in range(data.n)]
        async for step in deltas:
            accumulate(states, step)
        completion_tokens = sum(s.tokens for s in states)
        body = ChatCompletion(
            id=completion_id, created=created, model=model.id,
            choices=[
                ChatChoice(index=i, message=AssistantMessage(content=s.text), finish_reason=s.finish_reason,
                           logprobs=chat_logprobs(model, s.logprobs) if data.logprobs else None)
                for i, s in enumerate(states)
            ],
            usage=Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=completion_tokens,
                        total_tokens=len(request.prompt_ids) + completion_tokens),
        )
        return Response(msgspec.json.encode(body), media_type="application/json")


async def _stream(model: ServedModel, data: ChatCompletionRequest, first: list[Delta],
                  rest: AsyncIterator[list[Delta]], completion_id: str, created: int, prompt_tokens: int,
                  include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        return msgspec.json.encode(ChatCompletionChunk(id=completion_id, created=created, model=model.id,
                                                       choices=choices, usage=usage))

    completion_tokens = 0
    try:
        yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                     for i in range(data.n)])
        step: list[Delta] | None = first
        while step is not None:
            choices = []
            for delta in step:
                completion_tokens += len(delta.token_ids)
                if delta.text or delta.finish_reason or (data.logprobs and delta.logprobs):
                    choices.append(ChatChunkChoice(
                        index=delta.index,
                        delta=ChatDelta(content=delta.text) if delta.text else ChatDelta(),
                        finish_reason=delta.finish_reason,
                        logprobs=chat_logprobs(model, delta.logprobs) if data.logprobs else None,
                    ))
            if choices:
                yield chunk(choices)
            step = await anext(rest, None)
        if include_usage:
            yield chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                  total_tokens=prompt_tokens + completion_tokens))
    except Exception as exc:  # headers are sent: the error travels as a final event
        log.warning("stream %s ended by error: %s", completion_id, exc)
        yield error_payload(exc)
    finally:
        await rest.aclose()  # a vanished client frees its batch slot now, not at garbage collection
    yield b"[DONE]"

"""POST /v1/completions: the legacy prompt API; several prompts run concurrently in the batch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import msgspec
from litestar import Controller, Response, post
from litestar.response import ServerSentEvent

from fastllm.config import Settings
from fastllm.errors import InvalidRequestError
from fastllm.runtime.generation import Delta
from fastllm.runtime.models import ServedModel
from fastllm.runtime.sampling import TokenLogprob
from fastllm.server import requests
from fastllm.server.errors import error_payload
from fastllm.server.metrics import Metrics
from fastllm.server.openapi import MODEL_ERRORS, responses, streaming
from fastllm.server.outputs import ChoiceState, accumulate, prompt_cached_tokens, request_id, run, usage
from fastllm.server.registry import ModelRegistry
from fastllm.server.schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage

log = logging.getLogger(__name__)


def completion_logprobs(model: ServedModel, logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for item in logprobs:
        text = model.tokenizer.token_text(item.token_id)
        tokens.append(text)
        values.append(item.logprob)
        tops.append({model.tokenizer.token_text(i): v for i, v in item.top})
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


async def _merged(streams: list[AsyncIterator[list[Delta]]], n: int) -> AsyncIterator[list[Delta]]:
    """Interleave the deltas of several prompts, renumbering choices to prompt * n + choice."""
    if len(streams) == 1:
        async for step in streams[0]:
            yield step
        return
    queue: asyncio.Queue[list[Delta] | BaseException | None] = asyncio.Queue()

    async def pump(offset: int, stream: AsyncIterator[list[Delta]]) -> None:
        try:
            async for step in stream:
                for delta in step:
                    delta.index += offset
                await queue.put(step)
            await queue.put(None)
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i * n, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(tasks):
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


class CompletionsController(Controller):
    path = "/v1/completions"
    tags = ["completions"]

    @post(status_code=200, summary="Create a completion", operation_class=streaming(Completion),
          responses=responses(Completion, "The completion; Server-Sent Events of chunks when `stream` is true",
                              408, *MODEL_ERRORS))
    async def create(self, data: CompletionRequest, registry: ModelRegistry, settings: Settings,
                     metrics: Metrics) -> Response[bytes] | ServerSentEvent:
        model = registry.generator(data.model)
        prompts = requests.token_lists(model, data.prompt, "prompt")
        # Each prompt takes a place in the engine's queue: more than it holds could never be served (not a 429).
        capacity = settings.runtime.max_batch_size + settings.runtime.max_queue
        if len(prompts) > capacity:
            raise InvalidRequestError(f"prompt holds {len(prompts)} prompts; this server takes at most {capacity} "
                                      "in one request", param="prompt")
        top = data.logprobs or 0
        built = [
            requests.build(model, data, ids, max_n=settings.runtime.max_n, logprobs=data.logprobs is not None,
                           top_logprobs=top, max_tokens=data.max_tokens if data.max_tokens is not None else 16)
            for ids in prompts
        ]
        await requests.completion_grammar(model, data, built)
        echoes = [model.tokenizer.decode(r.prompt_ids) if data.echo else "" for r in built]
        prompt_tokens = sum(len(r.prompt_ids) for r in built)
        completion_id, created = request_id("cmpl"), int(time.time())
        deltas = _merged([run(model, r, metrics, settings.server.request_timeout, f"{completion_id}/{i}")
                          for i, r in enumerate(built)], data.n)
        total = len(built) * data.n
        if data.stream:
            first = await anext(deltas)
            return ServerSentEvent(_stream(model, data, first, deltas, completion_id, created, prompt_tokens,
                                           echoes))
        states = [ChoiceState() for _ in range(total)]
        async for step in deltas:
            accumulate(states, step)
        completion_tokens = sum(s.tokens for s in states)
        choices = []
        for i, state in enumerate(states):
            echo = echoes[i // data.n]
            choices.append(CompletionChoice(
                index=i, text=echo + state.text, finish_reason=state.finish_reason,
                logprobs=completion_logprobs(model, state.logprobs, len(echo)) if data.logprobs is not None
                else None,
            ))
        body = Completion(id=completion_id, created=created, model=model.id, choices=choices,
                          usage=usage(prompt_tokens, completion_tokens,
                                      sum(s.cached_tokens for s in states[::data.n])))
        return Response(msgspec.json.encode(body), media_type="application/json")


async def _stream(model: ServedModel, data: CompletionRequest, first: list[Delta],
                  rest: AsyncIterator[list[Delta]], completion_id: str, created: int, prompt_tokens: int,
                  echoes: list[str]) -> AsyncIterator[bytes]:
    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return msgspec.json.encode(Completion(id=completion_id, created=created, model=model.id,
                                              choices=choices, usage=usage))

    completion_tokens = cached_tokens = 0
    offsets = [len(echoes[i // data.n]) for i in range(len(echoes) * data.n)]
    try:
        if data.echo:
            yield chunk([CompletionChoice(index=i, text=echoes[i // data.n], finish_reason=None)
                         for i in range(len(offsets))])
        step: list[Delta] | None = first
        while step is not None:
            choices = []
            cached_tokens += prompt_cached_tokens(step, data.n)
            for delta in step:
                completion_tokens += len(delta.token_ids)
                logprobs = None
                if data.logprobs is not None:
                    logprobs = completion_logprobs(model, delta.logprobs, offsets[delta.index])
                offsets[delta.index] += len(delta.text)
                if delta.text or delta.finish_reason or logprobs:
                    choices.append(CompletionChoice(index=delta.index, text=delta.text,
                                                    finish_reason=delta.finish_reason, logprobs=logprobs))
            if choices:
                yield chunk(choices)
            step = await anext(rest, None)
        if data.stream_options and data.stream_options.include_usage:
            yield chunk([], usage(prompt_tokens, completion_tokens, cached_tokens))
    except Exception as exc:
        log.warning("stream %s ended by error: %s", completion_id, exc)
        yield error_payload(exc)
    finally:
        await rest.aclose()
    yield b"[DONE]"

"""Shared plumbing of the two generation endpoints: run the engine with a deadline and metrics,
and gather per-choice text, token counts and logprobs."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastllm.errors import RequestError
from fastllm.runtime.generation import Delta, GenerationRequest
from fastllm.runtime.models import ServedModel
from fastllm.runtime.sampling import TokenLogprob
from fastllm.server.metrics import Metrics
from fastllm.server.schemas import PromptTokensDetails, Usage

log = logging.getLogger("fastllm.requests")


class RequestTimeoutError(RequestError):
    status = 408
    error_type = "timeout_error"
    code = "timeout"


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class ChoiceState:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int = 0


async def run(model: ServedModel, request: GenerationRequest, metrics: Metrics, timeout: float,
              request_id: str = "-") -> AsyncIterator[list[Delta]]:
    """The engine's deltas, with a deadline; records time to first token and inter-token latency, and
    logs one line per request with the model, provider, token counts and timings."""
    if model.generator is None:  # pragma: no cover - the registry checks the model kind first
        raise RuntimeError("not a generation model")
    metrics.prompt_tokens.labels(model.id).inc(len(request.prompt_ids) * request.n)
    deadline = time.monotonic() + timeout
    started = last = time.perf_counter()
    ttft = 0.0
    generated = 0
    outcome = "error"
    stream = model.generator.generate(request)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeoutError(f"the request took longer than {timeout:.0f}s and was cancelled")
            try:
                async with asyncio.timeout(remaining):
                    deltas = await anext(stream)
            except StopAsyncIteration:
                outcome = "ok"
                return
            except TimeoutError:
                raise RequestTimeoutError(f"the request took longer than {timeout:.0f}s and was cancelled") from None
            now = time.perf_counter()
            if generated == 0:  # every step carries at least one token, the first one included
                ttft = now - started
                metrics.time_to_first_token.labels(model.id).observe(ttft)
            else:
                metrics.inter_token_latency.labels(model.id).observe(now - last)
            last = now
            step_tokens = sum(len(d.token_ids) for d in deltas)
            generated += step_tokens
            metrics.generation_tokens.labels(model.id).inc(step_tokens)
            yield deltas
    except GeneratorExit:
        outcome = "cancelled"
        raise
    finally:
        await stream.aclose()
        log.info("request %s model=%s provider=%s prompt_tokens=%d completion_tokens=%d n=%d ttft_ms=%.0f "
                 "total_ms=%.0f outcome=%s", request_id, model.id, model.provider, len(request.prompt_ids),
                 generated, request.n, ttft * 1000, (time.perf_counter() - started) * 1000, outcome)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    """OpenAI's usage, with the prompt tokens the prefix cache spared in ``prompt_tokens_details``."""
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def prompt_cached_tokens(deltas: list[Delta], n: int) -> int:
    """Cached prompt tokens announced in ``deltas``: each prompt's first choice (index % n == 0) says it once."""
    return sum(d.cached_tokens for d in deltas if d.index % n == 0)


def accumulate(states: list[ChoiceState], deltas: list[Delta]) -> None:
    for delta in deltas:
        state = states[delta.index]
        state.text += delta.text
        state.tokens += len(delta.token_ids)
        state.logprobs.extend(delta.logprobs)
        state.cached_tokens = max(state.cached_tokens, delta.cached_tokens)
        if delta.finish_reason:
            state.finish_reason = delta.finish_reason

"""The load generator: streamed chat completions (or embeddings) at a fixed concurrency.

Timing is taken from the wire, as a client sees it: time to first token is the first chunk that carries
text, inter-token latency the gaps between text chunks. Token counts come from the server's usage
(``stream_options.include_usage``) where it sends one, otherwise from the number of text chunks, which is
exact for servers that stream one token per chunk (ours, llama.cpp's, vLLM's).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how a refrigerator keeps food cold, for a curious ten-year-old.",
    "Describe the water cycle in detail, from evaporation to precipitation and back to the oceans.",
    "Give a long list of practical tips for learning a new programming language quickly.",
    "Tell me about the history of the bicycle, from its invention to modern racing bikes.",
    "Write a letter to a friend describing a week-long hiking trip through the mountains.",
    "Explain how the internet routes a message from one computer to another across the world.",
    "Describe a busy market in a small coastal town early on a summer morning.",
]

SENTENCES = [
    "A man is eating food.", "A man is riding a white horse on an enclosed ground.",
    "The new movie is awesome and everyone should see it.", "Two dogs are playing in the snow near a fence.",
    "The quarterly report shows revenue growth across all regions.", "She plays the violin beautifully.",
    "Python is a popular programming language for data science.", "It is going to rain tomorrow afternoon.",
]


@dataclass
class RequestResult:
    ok: bool
    start: float
    end: float
    ttft: float | None = None  # seconds to the first text chunk
    gaps: list[float] = field(default_factory=list)  # seconds between text chunks
    tokens: int = 0
    error: str = ""

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LevelRun:
    """One round at one level: every request's result and the round's wall time."""

    wall: float
    results: list[RequestResult]


@dataclass
class Target:
    base_url: str  # e.g. http://127.0.0.1:3000/v1
    model: str
    api_key: str | None = None
    max_tokens: int = 128
    timeout: float = 300.0
    # Token ids to forbid with OpenAI's logit_bias, so servers without ``ignore_eos`` (llama.cpp's
    # Python server) still answer max_tokens tokens and every server does the same work.
    ban_token_ids: list[int] = field(default_factory=list)
    # 0: greedy, the same tokens from every server; OpenAI's default is 1, where sampling costs per token too.
    temperature: float = 0.0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def _chat(client: httpx.AsyncClient, target: Target, prompt: str) -> RequestResult:
    body: dict[str, Any] = {
        "model": target.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": target.max_tokens,
        "temperature": target.temperature, "stream": True, "stream_options": {"include_usage": True},
        # A fixed output length where the server honours it (FastLLM, vLLM, llama.cpp's own server).
        "ignore_eos": True,
    }
    if target.ban_token_ids:
        body["logit_bias"] = {str(t): -100 for t in target.ban_token_ids}
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start, end=start)
    chunks = 0
    usage_tokens: int | None = None
    last = start
    try:
        async with client.stream("POST", f"{target.base_url}/chat/completions", json=body,
                                 headers=target.headers()) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                choices = event.get("choices") or []
                if not choices or not (choices[0].get("delta") or {}).get("content"):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
                chunks += 1
        result.tokens = usage_tokens if usage_tokens is not None else chunks
        result.ok = chunks > 0
        if not result.ok:
            result.error = "the stream carried no text"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.end = time.perf_counter()
    return result


async def _embed(client: httpx.AsyncClient, target: Target, inputs: list[str]) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start, end=start)
    try:
        response = await client.post(f"{target.base_url}/embeddings", json={"model": target.model, "input": inputs},
                                     headers=target.headers())
        if response.status_code == 200 and len(response.json().get("data", [])) == len(inputs):
            result.ok, result.tokens = True, len(inputs)
        else:
            result.error = f"HTTP {response.status_code}: {response.text[:200]}"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.end = time.perf_counter()
    return result


async def run_level(target: Target, concurrency: int, requests: int, max_seconds: float,
                    embed_batch: int = 0) -> LevelRun:
    """Send ``requests`` requests with at most ``concurrency`` in flight; stop issuing after ``max_seconds``.

    With ``embed_batch`` > 0 each request is an embeddings call of that many inputs, and a result's
    ``tokens`` counts inputs.
    """
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=target.timeout, limits=limits) as client:
        start = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() - start < max_seconds:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if embed_batch:
                    batch = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(embed_batch)]
                    results.append(await _embed(client, target, batch))
                else:
                    results.append(await _chat(client, target, PROMPTS[i % len(PROMPTS)]))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return LevelRun(wall=wall, results=results)


async def warm_up(target: Target, embed_batch: int = 0) -> RequestResult:
    """One request before timing: loads lazy state (graph optimisation, allocator arenas) on the server."""
    async with httpx.AsyncClient(timeout=target.timeout) as client:
        if embed_batch:
            return await _embed(client, target, SENTENCES[:embed_batch])
        return await _chat(client, target, PROMPTS[0])

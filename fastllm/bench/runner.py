"""A sweep: warm up, then each level ``repeat`` times, one level after another, one server at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx

from fastllm.bench.load import LevelRun, Target, run_level, warm_up
from fastllm.bench.report import BenchRun
from fastllm.bench.summary import LevelSummary, summarise
from fastllm.errors import BenchError


def discover_model(target: Target) -> str:
    """The first id of ``/v1/models``: what a client would pick when told nothing."""
    base_url = target.base_url
    try:
        response = httpx.get(f"{base_url}/models", headers=target.headers(), timeout=30)
        response.raise_for_status()
        models = response.json()["data"]
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        raise BenchError(f"cannot list the models of {base_url}: {exc}") from exc
    if not models:
        raise BenchError(f"{base_url} serves no models")
    return str(models[0]["id"])


def sweep(target: Target, levels: list[int], *, label: str, requests: Callable[[int], int], repeat: int,
          max_seconds: float, embeddings: bool = False,
          progress: Callable[[LevelSummary], None] | None = None) -> BenchRun:
    """``levels`` are concurrencies for chat, batch sizes for embeddings (then one request in flight)."""
    first = asyncio.run(warm_up(target, embed_batch=levels[0] if embeddings else 0))
    if not first.ok:
        raise BenchError(f"the warm-up request to {target.base_url} failed: {first.error}")
    summaries = []
    for level in levels:
        rounds: list[LevelRun] = []
        for _ in range(repeat):
            if embeddings:
                rounds.append(asyncio.run(run_level(target, 1, requests(level), max_seconds, embed_batch=level)))
            else:
                rounds.append(asyncio.run(run_level(target, level, requests(level), max_seconds)))
        summary = summarise(level, rounds)
        summaries.append(summary)
        if progress:
            progress(summary)
    return BenchRun(label=label, base_url=target.base_url, model=target.model,
                    mode="embeddings" if embeddings else "chat", max_tokens=0 if embeddings else target.max_tokens,
                    repeat=repeat, levels=summaries, x_label="batch size" if embeddings else "concurrent clients")

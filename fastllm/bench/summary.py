"""Per-level figures from raw request results: rates are medians over rounds, latencies pooled."""

from __future__ import annotations

import math
import statistics

import msgspec

from fastllm.bench.load import LevelRun


class LevelSummary(msgspec.Struct):
    concurrency: int
    requests: int
    errors: int
    req_s: float
    tok_s: float  # generated tokens (or embedded inputs) per second, all clients together
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p95_ms: float | None = None
    e2e_p50_ms: float | None = None
    e2e_p95_ms: float | None = None
    tokens_per_request: float | None = None
    first_error: str = ""


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: no interpolation between two samples that never happened."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarise(level: int, rounds: list[LevelRun]) -> LevelSummary:
    """``level``: the clients (chat) or the batch size (embeddings) the rounds ran at."""
    results = [r for run in rounds for r in run.results]
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    latencies = [r.latency for r in ok]
    per_round_req = [sum(r.ok for r in run.results) / run.wall for run in rounds if run.wall > 0]
    per_round_tok = [sum(r.tokens for r in run.results if r.ok) / run.wall for run in rounds if run.wall > 0]
    return LevelSummary(
        concurrency=level, requests=len(results), errors=len(errors),
        req_s=round(statistics.median(per_round_req), 2) if per_round_req else 0.0,
        tok_s=round(statistics.median(per_round_tok), 1) if per_round_tok else 0.0,
        ttft_p50_ms=_ms(percentile(ttfts, 50)), ttft_p95_ms=_ms(percentile(ttfts, 95)),
        itl_p50_ms=_ms(percentile(gaps, 50)), itl_p95_ms=_ms(percentile(gaps, 95)),
        e2e_p50_ms=_ms(percentile(latencies, 50)), e2e_p95_ms=_ms(percentile(latencies, 95)),
        tokens_per_request=round(statistics.mean(r.tokens for r in ok), 1) if ok else None,
        first_error=errors[0].error if errors else "",
    )

"""Prometheus metrics, on a registry owned by the app (two apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fastllm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("fastllm_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("fastllm_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.embedding_inputs = Counter("fastllm_embedding_inputs", "Inputs embedded", ["model"], registry=r)
        self.time_to_first_token = Histogram("fastllm_time_to_first_token_seconds", "Time to first token",
                                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("fastllm_inter_token_latency_seconds", "Time between tokens",
                                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("fastllm_queue_depth", "Requests waiting for a batch slot", ["model"],
                                 registry=r)
        self.batch_size = Gauge("fastllm_batch_size", "Sequences in the running batch", ["model"], registry=r)
        self.in_flight = Gauge("fastllm_requests_in_flight", "HTTP requests being served", registry=r)
        self.grammars_compiled = Gauge("fastllm_grammars_compiled", "Distinct grammars (schemas, tool sets) "
                                       "compiled for constrained decoding", ["model"], registry=r)
        self.grammar_cache_hits = Gauge("fastllm_grammar_cache_hits", "Constrained requests whose grammar was "
                                        "already compiled", ["model"], registry=r)
        self.prefix_cache = {name: Gauge(f"fastllm_prefix_cache_{name}", help_text, ["model"], registry=r)
                             for name, help_text in (
                                 ("queries", "Prompts looked up in the prefix cache"),
                                 ("hits", "Prompts that reused cached KV (hit rate = hits / queries)"),
                                 ("whole_hits", "Of those, prompts cached whole with their last logits: nothing "
                                                "computed"),
                                 ("cached_tokens", "Prompt tokens reused from the prefix cache"),
                                 ("evicted_blocks", "Blocks evicted from the prefix cache"),
                                 ("bytes", "Host memory held by the prefix cache"),
                                 ("budget_bytes", "The prefix cache's memory budget"))}
        self.speculative = {name: Gauge(f"fastllm_speculative_{name}", help_text, ["model"], registry=r)
                            for name, help_text in (
                                ("drafted_tokens", "Tokens drafted by speculative decoding and verified"),
                                ("accepted_tokens", "Drafted tokens the model agreed with (acceptance rate = "
                                                    "accepted / drafted)"))}
        self.decode_steps = {name: Gauge(f"fastllm_{name}", help_text, ["model"], registry=r)
                             for name, help_text in (
                                 ("decode_steps", "Decode steps run"),
                                 ("decode_steps_int8", "Of those, steps of int8_decode_rows or more rows run through "
                                                       "the int8 prompt graph"))}
        self.kv_cache_bytes = Gauge("fastllm_kv_cache_bytes", "Memory the running batch's KV cache holds", ["model"],
                                    registry=r)
        self.kv_budget_bytes = Gauge("fastllm_kv_budget_bytes", "The running batch's KV memory budget (0 = none)",
                                     ["model"], registry=r)

    def watch_engine(self, model: str, stats: Callable[[], Any]) -> None:
        """Gauges read live from an engine's stats at scrape time."""
        self.queue_depth.labels(model).set_function(lambda: stats().waiting)
        self.batch_size.labels(model).set_function(lambda: stats().running)
        self.speculative["drafted_tokens"].labels(model).set_function(lambda: stats().drafted_tokens)
        self.speculative["accepted_tokens"].labels(model).set_function(lambda: stats().accepted_tokens)
        self.decode_steps["decode_steps"].labels(model).set_function(lambda: stats().steps)
        self.decode_steps["decode_steps_int8"].labels(model).set_function(lambda: stats().int8_steps)

    def watch_kv(self, model: str, engine: Any) -> None:
        self.kv_cache_bytes.labels(model).set_function(engine.kv_bytes)
        self.kv_budget_bytes.labels(model).set_function(lambda: engine.kv_budget_bytes or 0)

    def watch_prefix_cache(self, model: str, cache: Any) -> None:
        """The prefix cache's counters, read at scrape time."""
        for name, read in (("queries", lambda: cache.stats.queries), ("hits", lambda: cache.stats.hits),
                           ("whole_hits", lambda: cache.stats.whole_hits),
                           ("cached_tokens", lambda: cache.stats.cached_tokens),
                           ("evicted_blocks", lambda: cache.stats.evicted_blocks),
                           ("bytes", lambda: cache.used_bytes), ("budget_bytes", lambda: cache.budget_bytes)):
            self.prefix_cache[name].labels(model).set_function(read)

    def watch_grammars(self, model: str, compiler: Any) -> None:
        self.grammars_compiled.labels(model).set_function(lambda: compiler.compiled)
        self.grammar_cache_hits.labels(model).set_function(lambda: compiler.hits)

    def render(self) -> bytes:
        return generate_latest(self.registry)

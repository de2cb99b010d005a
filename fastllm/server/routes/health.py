"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State

from fastllm.server.errors import error_response
from fastllm.server.metrics import Metrics
from fastllm.server.openapi import responses


class HealthController(Controller):
    tags = ["health"]

    @get("/health", summary="Liveness: the process answers")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready", summary="Readiness: models are loaded and the server is not draining",
         responses=responses(dict[str, object], "Ready, with the ids of the served models", 503))
    async def ready(self, state: State) -> Response[bytes] | dict[str, object]:
        registry = state.get("registry")
        if registry is None or registry.draining:
            return error_response(503, "not ready", code="not_ready")
        return {"status": "ready", "models": [m.id for m in registry]}

    @get("/metrics", summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
    async def metrics(self, metrics: Metrics) -> bytes:
        return metrics.render()

"""The Litestar application: models opened in the lifespan, kept on ``app.state``, injected into
small controllers. Authentication and request metrics are plain ASGI middleware."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from litestar import Litestar, Request
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.types import ASGIApp, Receive, Scope, Send

from fastllm import __version__
from fastllm.config import Settings
from fastllm.errors import OverloadedError
from fastllm.runtime.models import load_model
from fastllm.server.errors import handle_exception
from fastllm.server.metrics import Metrics
from fastllm.server.registry import ModelRegistry
from fastllm.server.routes.chat import ChatController
from fastllm.server.routes.completions import CompletionsController
from fastllm.server.routes.embeddings import EmbeddingsController
from fastllm.server.routes.health import HealthController
from fastllm.server.routes.models import ModelsController
from fastllm.server.schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


def load_registry(settings: Settings) -> ModelRegistry:
    models = []
    try:
        for config in settings.all_models():
            models.append(load_model(config, settings.runtime, settings.models_dir))
    except BaseException:
        for model in models:
            model.close()
        raise
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        for model in models:
            model.close()
        from fastllm.errors import ConfigError

        raise ConfigError(f"two models are served under the same id: {ids}; set served_model_name")
    return ModelRegistry(models)


_UNAUTHORIZED = msgspec.json.encode(ErrorResponse(error=ErrorBody(
    message="Incorrect API key provided", type="authentication_error", code="invalid_api_key")))


def _auth_middleware(keys: list[str]) -> Any:
    expected = [f"Bearer {key}".encode() for key in keys]

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"")
                # Compare against every key, always: the time taken says nothing about which matched.
                if not any([hmac.compare_digest(given, key) for key in expected]):
                    await send({"type": "http.response.start", "status": 401, "headers": [
                        (b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
                    await send({"type": "http.response.body", "body": _UNAUTHORIZED})
                    return
            await app(scope, receive, send)

        return middleware

    return factory


def _metrics_middleware(metrics: Metrics) -> Any:
    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500

            async def capture(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            metrics.in_flight.inc()
            try:
                await app(scope, receive, capture)
            finally:
                metrics.in_flight.dec()
                route = scope.get("route_handler")
                path = scope["path"] if route is None else scope.get("path_template", scope["path"])
                metrics.requests.labels(path if path in _KNOWN_ROUTES else "other", str(status)).inc()

        return middleware

    return factory


async def _require_json(request: Request[Any, Any, Any]) -> None:
    """Before a POST body is parsed: one declared as anything but JSON is a 415 (undeclared is read as JSON),
    an empty one a 400 that says so."""
    if request.method != "POST":
        return
    declared = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if declared and declared != "application/json" and not declared.endswith("+json"):
        raise HTTPException(
            status_code=415,
            detail=f"the body must be JSON, sent with Content-Type: application/json (it was declared {declared!r})",
        )
    if not await request.body():  # read once, kept for the parser; the size limit applies here too
        raise HTTPException(status_code=400, detail="the request body is empty; send a JSON object")


_KNOWN_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health",
                           "/ready", "/metrics"})


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> Litestar:
    """Build the app; without a ``registry`` the models are loaded when the lifespan starts."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        models = registry if registry is not None else load_registry(settings)  # an empty one is falsy
        for model in models:
            if model.generator is not None:
                metrics.watch_engine(model.id, lambda g=model.generator: g.stats)
                metrics.watch_kv(model.id, model.generator)
            if model.grammars is not None:
                metrics.watch_grammars(model.id, model.grammars)
            if model.generator is not None and model.generator.prefix_cache is not None:
                metrics.watch_prefix_cache(model.id, model.generator.prefix_cache)
        app.state.registry = models
        started = time.monotonic()
        log.info("serving %s on http://%s:%s", ", ".join(m.id for m in models), settings.server.host,
                 settings.server.port)
        try:
            yield
        finally:
            models.draining = True
            log.info("shutting down after %.0fs; closing models", time.monotonic() - started)
            models.close()

    def get_registry(state: State) -> ModelRegistry:
        models: ModelRegistry = state.registry
        if models.draining:
            raise OverloadedError("the server is shutting down", status=503)
        return models

    middleware = [_metrics_middleware(metrics)]
    if settings.server.api_keys:
        middleware.append(_auth_middleware(settings.server.api_keys))
    cors = CORSConfig(allow_origins=settings.server.cors_origins, allow_credentials=False) \
        if settings.server.cors_origins else None
    return Litestar(
        route_handlers=[ChatController, CompletionsController, EmbeddingsController, ModelsController,
                        HealthController],
        dependencies={
            "registry": Provide(get_registry, sync_to_thread=False),
            "settings": Provide(lambda: settings, sync_to_thread=False),
            "metrics": Provide(lambda: metrics, sync_to_thread=False),
        },
        lifespan=[lifespan],
        exception_handlers={Exception: handle_exception},
        before_request=_require_json,
        middleware=middleware,
        cors_config=cors,
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="FastLLM", version=__version__, path="/docs"),
        logging_config=None,
        debug=False,
    )

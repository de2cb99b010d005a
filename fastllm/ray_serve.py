"""Scale out on Ray Serve: N replicas of the same Litestar app behind Ray's HTTP proxy.

Ray Serve runs any ASGI app through ``serve.ingress``; Ray 2.60 only registers its back-pressure
handlers on apps that have Starlette's ``add_exception_handler``, and skips Litestar, whose own
handlers already answer in OpenAI's shape. The app is built inside each replica
(``__serve_build_asgi_app__``), so models load there and never travel through pickle. Each response
carries ``x-fastllm-replica`` so operators (and our tests) can see which replica answered. Requests that
carry an ``x-session-id`` header are routed by ``fastllm.ray_router.SessionAffinityRouter``: every turn of
a conversation reaches the replica whose prefix cache already holds its history.

Two ways in:
    fastllm serve --ray --replicas 2 --model SmolLM2-135M-Instruct
    serve run fastllm.ray_serve:build_app replicas=2 config=config.toml
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from fastllm.config import Settings, load_settings
from fastllm.errors import MissingExtraError

log = logging.getLogger(__name__)


def _replica_header(app: Any, replica: str) -> Any:
    header = (b"x-fastllm-replica", replica.encode())

    async def tagged(scope: Any, receive: Any, send: Any) -> None:
        async def send_tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, send_tagged if scope["type"] == "http" else send)

    return tagged


def deployment(settings: Settings, *, replicas: int = 1, max_ongoing_requests: int = 32,
               autoscaling: dict[str, Any] | None = None, num_cpus: float = 1.0) -> Any:
    """A bound Ray Serve application: pass it to ``serve.run``."""
    try:
        from ray import serve
    except ImportError as exc:
        raise MissingExtraError("ray", exc.name or "ray") from None

    from ray.serve.config import RequestRouterConfig

    options: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing_requests,
        "ray_actor_options": {"num_cpus": num_cpus},
        "health_check_period_s": 10,
        # A conversation's turns (same x-session-id header) go to the replica that holds its prefix cache.
        "request_router_config": RequestRouterConfig(
            request_router_class="fastllm.ray_router.SessionAffinityRouter"),
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = replicas

    @serve.deployment(name="fastllm", **options)
    @serve.ingress()
    class FastLLMReplica:
        def __init__(self, settings_json: str) -> None:
            self.settings = Settings.model_validate_json(settings_json)

        def __serve_build_asgi_app__(self) -> Any:
            from fastllm.server.app import create_app

            logging.basicConfig(level=self.settings.server.log_level.upper())
            replica = serve.get_replica_context().replica_id.unique_id
            return _replica_header(create_app(self.settings), replica)

    return FastLLMReplica.bind(settings.model_dump_json())


def build_app(args: dict[str, str]) -> Any:
    """Application builder for ``serve run fastllm.ray_serve:build_app key=value ...``.

    Keys: ``config`` (a config file), ``model`` (a model id), ``replicas``, ``max_ongoing_requests``,
    ``min_replicas`` and ``max_replicas`` (autoscaling instead of a fixed count).
    """
    overrides: dict[str, Any] = {"model": {"model_id": args["model"]}} if "model" in args else {}
    settings = load_settings(Path(args["config"]) if "config" in args else None, overrides)
    autoscaling = None
    if "max_replicas" in args:
        autoscaling = {"min_replicas": int(args.get("min_replicas", 1)), "max_replicas": int(args["max_replicas"])}
    return deployment(settings, replicas=int(args.get("replicas", 1)),
                      max_ongoing_requests=int(args.get("max_ongoing_requests", 32)), autoscaling=autoscaling)


def run(settings: Settings, *, replicas: int, max_ongoing_requests: int = 32, num_cpus: float = 1.0) -> None:
    """Start (or join, where RAY_ADDRESS is set) a Ray cluster and serve until SIGTERM/SIGINT."""
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        # A single-node instance stays on loopback. Ray otherwise swaps 127.0.0.1 for the machine's
        # routable address; this switch (read at import, inherited by Ray's processes) keeps it local.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # Serve's controller gives a starting proxy actor 5 s to report ready (then 10, 15, ...) and kills
        # it when it misses; on a loaded small machine importing the proxy takes longer, and serve.start
        # fails with ActorDiedError. A proxy that is merely slow is given a minute.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30")
        # Ray starts its workers, and so every replica, at niceness 15: beside any ordinary process on the
        # machine the replicas then get a few percent of a core (on 2 cores with 2 busy processes: 42-token
        # prompts answered in 3-5 s instead of 50 ms, replicas 3 min to load instead of 6 s). The replicas are
        # the server, so they run at the niceness `fastllm serve` itself has. A joined cluster keeps its own.
        os.environ.setdefault("RAY_worker_niceness", "0")
    import ray
    from ray import serve

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False,
             **({"_node_ip_address": "127.0.0.1"} if local else {}))
    try:
        for attempt in range(3):  # serve.start waits a fixed 60 s for the proxy; a slow one is waited for again
            try:
                serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
                break
            except TimeoutError:
                if attempt == 2:
                    raise
                log.warning("Ray Serve's HTTP proxy is not ready after 60 s; waiting again")
        serve.run(deployment(settings, replicas=replicas, max_ongoing_requests=max_ongoing_requests,
                             num_cpus=num_cpus), name="fastllm", route_prefix="/")
        log.info("Ray Serve: %d replicas on http://%s:%s", replicas, settings.server.host, settings.server.port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        log.info("stopping Ray Serve")
    finally:
        serve.shutdown()
        ray.shutdown()

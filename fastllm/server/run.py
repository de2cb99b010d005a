"""Start uvicorn on the app, with models loaded first so a bad model fails before the port opens."""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from fastllm.config import Settings
from fastllm.runtime.kv_cache import small_pages_only
from fastllm.server.app import create_app, load_registry
from fastllm.server.registry import ModelRegistry

log = logging.getLogger(__name__)


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, refuse new requests with 503 at once, then let uvicorn drain the rest."""

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry) -> None:
        super().__init__(config)
        self.registry = registry

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.registry.draining:
            log.info("signal %s: draining in-flight requests (up to %ss)", sig,
                     self.config.timeout_graceful_shutdown)
        self.registry.draining = True
        super().handle_exit(sig, frame)


def run_server(settings: Settings) -> None:
    small_pages_only()
    registry = load_registry(settings)
    app = create_app(settings, registry)
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        timeout_graceful_shutdown=int(settings.server.shutdown_timeout),
        log_config=None,  # keep our logging setup
        access_log=settings.server.log_level == "debug",
    )
    _DrainingServer(config, registry).run()

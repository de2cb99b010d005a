"""Server options that need their own app: CORS (off by default) and the request timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from litestar.testing import TestClient

from fastllm.config import ModelConfig, RuntimeConfig, ServerConfig, Settings
from fastllm.runtime.models import ServedModel, load_model
from fastllm.server.app import create_app
from fastllm.server.registry import ModelRegistry

CHAT = "SmolLM2-135M-Instruct"
LONG = {"model": CHAT, "max_tokens": 400, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me a very long story."}]}


@pytest.fixture(scope="module")
def model(smollm2_fp32: Path) -> ServedModel:
    served = load_model(ModelConfig(model_id=str(smollm2_fp32)), RuntimeConfig(), Path("models"))
    yield served
    served.close()


def _client(model: ServedModel, **server: object) -> TestClient:
    # The registry is shared across apps: closing is left to the fixture.
    registry = ModelRegistry([model])
    registry.close = lambda: None  # type: ignore[method-assign]
    return TestClient(create_app(Settings(server=ServerConfig(**server)), registry), timeout=120)


def test_cors_is_off_by_default(model: ServedModel) -> None:
    with _client(model) as client:
        response = client.options("/v1/models", headers={"Origin": "https://app.example",
                                                         "Access-Control-Request-Method": "GET"})
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-origin" not in client.get("/v1/models",
                                                               headers={"Origin": "https://app.example"}).headers


def test_cors_allows_only_the_configured_origins_without_credentials(model: ServedModel) -> None:
    with _client(model, cors_origins=["https://app.example"]) as client:
        allowed = client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-credentials" not in allowed.headers
        other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"


def test_request_timeout_cancels_the_generation_with_408(model: ServedModel) -> None:
    with _client(model, request_timeout=0.5) as client:
        response = client.post("/v1/chat/completions", json=LONG)
        assert response.status_code == 408
        assert response.json()["error"]["code"] == "timeout"
        # the cancelled generation leaves the batch at the engine's next step
        engine = model.generator
        assert engine is not None
        deadline = time.monotonic() + 10
        while engine.stats.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats.running == 0
    with _client(model) as patient:  # the engine serves on (without a deadline a loaded machine could miss)
        assert patient.post("/v1/chat/completions", json={**LONG, "max_tokens": 2}).status_code == 200

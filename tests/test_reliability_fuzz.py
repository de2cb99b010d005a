"""Fuzz the API from its own OpenAPI schema (schemathesis): no 5xx, no answer outside the documented shapes.

Both valid requests (positive mode) and schema-violating ones (negative mode, which must be refused with a
4xx) are generated for every operation the schema lists, and each response is checked against what
/docs/openapi.json documents for that operation: status code, content type, headers and body schema.

Generation stays cheap: the chat model is served with a 48-token context (so no request can ask for
more than 48 tokens), at most 2 choices per request and a 30 s request timeout. The `model` field is
steered to the served ids so that requests reach the engines instead of all
stopping at 404; responses are still validated against the unmodified schema.
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serving import Server, run_server

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
CONTEXT = 48
# Examples per operation and mode; the engines' operations get more. About 1.5 minutes on 2 CPU cores.
EXAMPLES = {"/v1/chat/completions": 40, "/v1/completions": 40, "/v1/embeddings": 40}
OTHER_EXAMPLES = 15
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


def _small_context_copy(source: Path, target: Path) -> Path:
    """``source`` with its manifest's context cut to CONTEXT tokens; every other file is a link."""
    target.mkdir()
    for item in source.iterdir():
        if item.name != "fastllm.json":
            (target / item.name).symlink_to(item)
    manifest = json.loads((source / "fastllm.json").read_text())
    manifest["context_length"] = CONTEXT
    (target / "fastllm.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture(scope="module")
def fuzz_server(smollm2_fp32: Path, minilm_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("fuzz")
    chat = _small_context_copy(smollm2_fp32, folder / "smollm2-ctx64")
    config = folder / "config.toml"
    config.write_text(
        f'[model]\nmodel_id = "{chat}"\nserved_model_name = "{CHAT}"\n\n'
        f'[[models]]\nmodel_id = "{minilm_export}"\nserved_model_name = "{EMBED}"\n\n'
        '[server]\nrequest_timeout = 30\n\n[runtime]\nmax_n = 2\nmax_batch_size = 8\n'
    )
    with run_server(["--config", str(config)], log_dir=folder) as running:
        yield running


def _steer_model_ids(raw: dict) -> dict:
    """Request bodies name the served model of their kind instead of random strings (which would all be 404s;
    unknown and wrong-kind models are tested in test_api_openai.py)."""
    for name, model in (("ChatCompletionRequest", CHAT), ("CompletionRequest", CHAT), ("EmbeddingRequest", EMBED)):
        raw["components"]["schemas"][name]["properties"]["model"] = {"const": model}
    return raw


def test_openapi_documents_errors_and_streams(fuzz_server: Server) -> None:
    """The schema itself: every model endpoint documents OpenAI-shaped errors, the generation ones SSE."""
    raw = httpx.get(f"{fuzz_server.url}/docs/openapi.json").json()
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        responses = raw["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "415", "429", "500", "503"} <= set(responses), path
        for status, response in responses.items():
            if status != "200":
                assert response["content"]["application/json"]["schema"] == error_ref, (path, status)
        assert "$ref" in responses["200"]["content"]["application/json"]["schema"]
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert "text/event-stream" in raw["paths"][path]["post"]["responses"]["200"]["content"]
    assert raw["paths"]["/v1/models/{model_id}"]["get"]["responses"]["404"]["content"]["application/json"][
        "schema"] == error_ref


def _fuzz(operation: Any, mode: GenerationMode, base_url: str, failures: list[str], calls: Counter[str]) -> bool:
    """Fuzz one operation; False when there is nothing to generate (negative mode, no parameters and no body)."""
    label = f"{operation.method.upper()} {operation.path} [{mode.value}]"
    checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])

    @settings(max_examples=EXAMPLES.get(operation.path, OTHER_EXAMPLES), deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        response = case.call(base_url=base_url, timeout=60)
        calls["total"] += 1
        calls[f"{response.status_code // 100}xx"] += 1
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as exc:  # collect every operation's failures, then report them together
            failures.append(f"{label}: {str(exc)[:1500]}")

    try:
        fuzz()
    except Unsatisfiable:
        if mode is GenerationMode.NEGATIVE:
            return False
        raise
    return True


_CHUNK = (b'{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", '
          b'"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}')


@pytest.mark.parametrize(("status", "content_type", "body", "caught"), [
    (200, "application/json", b'{"id": "c", "object": "chat.completion", "created": 1, "model": "m"}', True),
    (200, "text/event-stream", b"data: " + _CHUNK.replace(b'"index": 0', b'"index": "0"') + b"\n\ndata: [DONE]\n\n",
     True),
    (200, "text/plain", b"hello", True),
    (400, "application/json", b'{"status_code": 400, "detail": "Bad Request"}', True),  # Litestar's shape
    (418, "application/json", b'{"error": {"message": "x", "type": "t", "param": null, "code": null}}', True),
    (500, "application/json", b'{"error": {"message": "x", "type": "t", "param": null, "code": null}}', True),
    (200, "text/event-stream", b"data: " + _CHUNK + b"\n\ndata: [DONE]\n\n", False),
    (400, "application/json", b'{"error": {"message": "x", "type": "t", "param": "n", "code": null}}', False),
], ids=["json-missing-fields", "sse-malformed-chunk", "undocumented-content-type", "litestar-error-shape",
        "undocumented-status", "server-error", "good-stream", "good-error"])
def test_the_checks_catch_responses_outside_the_documented_shapes(
        fuzz_server: Server, status: int, content_type: str, body: bytes, caught: bool) -> None:
    """Negative control: the same checks as the fuzzing, on crafted responses, fail exactly on the bad ones."""
    raw = httpx.get(f"{fuzz_server.url}/docs/openapi.json").json()
    operation = schemathesis.openapi.from_dict(raw)["/v1/chat/completions"]["POST"]
    case = operation.Case(body={"model": CHAT, "messages": [{"role": "user", "content": "hi"}]},
                          media_type="application/json")
    request = httpx.Request("POST", f"{fuzz_server.url}/v1/chat/completions")
    response = httpx.Response(status, headers={"content-type": content_type}, content=body, request=request)
    response.elapsed = datetime.timedelta(milliseconds=1)
    if caught:
        with pytest.raises(FailureGroup):
            case.validate_response(response, checks=CHECKS)
    else:
        case.validate_response(response, checks=CHECKS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_fuzzing_from_the_schema_finds_no_server_error_and_no_undocumented_response(
        fuzz_server: Server, mode: GenerationMode) -> None:
    failures: list[str] = []
    calls: Counter[str] = Counter()
    raw = httpx.get(f"{fuzz_server.url}/docs/openapi.json").json()
    schema = schemathesis.openapi.from_dict(_steer_model_ids(raw))
    skipped = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        if not _fuzz(operation, mode, fuzz_server.url, failures, calls):
            skipped.add(operation.path)
    # Nothing to negate: GETs without parameters, and a path parameter any string satisfies.
    assert skipped <= {"/health", "/ready", "/metrics", "/v1/models", "/v1/models/{model_id}"}, skipped
    print(f"schemathesis, {mode.value} mode: {dict(calls)}; nothing to generate for {sorted(skipped)}")
    assert not failures, "\n\n".join(failures[:10])
    assert calls["5xx"] == 0 and calls["total"] >= 100, calls
    if mode is GenerationMode.POSITIVE:
        assert calls["2xx"] >= 30, calls  # the fuzzing reached the engines, not only the validators
    assert "Traceback" not in fuzz_server.output()


@pytest.mark.parametrize("body", [
    {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "n": 2, "stream": True,
     "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}},
    {"model": CHAT, "prompt": [[1, 2], [3]], "max_tokens": 2, "n": 2, "echo": True, "logprobs": 1},
])
def test_a_cheap_request_is_served_within_the_small_context(fuzz_server: Server, body: dict) -> None:
    """The fuzz server really serves generation (the fuzzing above is not just 4xx all the way)."""
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = httpx.post(f"{fuzz_server.url}{path}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    too_long = httpx.post(f"{fuzz_server.url}{path}", json={**body, "max_tokens": CONTEXT}, timeout=60)
    assert too_long.status_code == 400 and str(CONTEXT) in too_long.json()["error"]["message"]

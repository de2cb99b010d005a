"""Bad input, limits, auth, disconnects, overload and shutdown, over raw HTTP against the real server."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from serving import Server, run_server

CHAT = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None,
                        code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture(scope="module")
def http(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def chat(http: httpx.Client, **fields: object) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": CHAT, "messages": MESSAGES, "max_tokens": 4, **fields})


def test_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                         headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_invalid_utf8_body_is_400(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", content=b'{"model": "\xff\xfe", "messages": []}',
                         headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", 5), ("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("max_tokens", 0),
    ("max_tokens", -5), ("presence_penalty", 3), ("top_logprobs", 50), ("messages", "hi"), ("messages", []),
    ("stop", ["x"] * 100), ("stop", 5),
])
def test_invalid_field_is_400_naming_it(http: httpx.Client, field: str, value: object) -> None:
    error = assert_openai_error(chat(http, **{field: value}), 400)
    assert field in (error["param"] or "") or field in error["message"]


def test_huge_n_is_refused(http: httpx.Client) -> None:
    assert_openai_error(chat(http, n=1000), 400, param="n")


def test_unsupported_role_and_content_part(http: httpx.Client) -> None:
    assert_openai_error(chat(http, messages=[{"role": "wizard", "content": "hi"}]), 400)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    assert_openai_error(chat(http, messages=image), 400)


def test_content_as_text_parts_is_accepted(http: httpx.Client) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    response = chat(http, messages=parts, temperature=0, max_tokens=12)
    assert response.status_code == 200
    assert "Paris" in response.json()["choices"][0]["message"]["content"]


def test_token_ids_outside_the_vocabulary_are_400(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": CHAT, "prompt": [1, 2, 10**9], "max_tokens": 2})
    assert_openai_error(response, 400, param="prompt")
    response = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [[101, 10**7]]})
    assert_openai_error(response, 400, param="input")


def test_mixed_prompt_kinds_are_400(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"model": CHAT, "prompt": ["text", 5], "max_tokens": 2})
    assert_openai_error(response, 400, param="prompt")


def test_empty_embedding_input_is_400(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ""}), 400)
    assert_openai_error(http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": []}), 400)


def test_deeply_nested_json_is_a_client_error(http: httpx.Client) -> None:
    body = '{"model": "x", "messages": ' + "[" * 50_000 + "]" * 50_000 + "}"
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_oversized_body_is_413(http: httpx.Client) -> None:
    huge = "x" * (5 * 1024 * 1024)
    response = http.post("/v1/chat/completions",
                         json={"model": CHAT, "messages": [{"role": "user", "content": huge}]})
    assert_openai_error(response, 413)


def test_unknown_route_and_wrong_method_keep_the_error_shape(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)


def test_health_ready_and_openapi(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready").json()
    assert ready["status"] == "ready" and CHAT in ready["models"]
    schema = http.get("/docs/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_tokens_and_latency(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    reply = chat(http, temperature=0, max_tokens=5).json()
    after = http.get("/metrics").text
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert _metric(after, "fastllm_requests_total", **route) == _metric(before, "fastllm_requests_total", **route) + 1
    generated = _metric(after, "fastllm_generation_tokens_total", model=CHAT) - _metric(
        before, "fastllm_generation_tokens_total", model=CHAT)
    assert generated == reply["usage"]["completion_tokens"]
    assert _metric(after, "fastllm_time_to_first_token_seconds_count", model=CHAT) >= 1
    assert "fastllm_queue_depth" in after and "fastllm_batch_size" in after


def test_client_disconnect_mid_stream_frees_the_slot(http: httpx.Client, server: Server) -> None:
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as own, own.stream("POST", "/v1/chat/completions",
                                                                          json=body) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
            if seen >= 5:
                break
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _metric(http.get("/metrics").text, "fastllm_batch_size", model=CHAT) == 0:
            break
        time.sleep(0.2)
    metrics = http.get("/metrics").text
    assert _metric(metrics, "fastllm_batch_size", model=CHAT) == 0
    generated = _metric(metrics, "fastllm_generation_tokens_total", model=CHAT)
    time.sleep(1)
    assert _metric(http.get("/metrics").text, "fastllm_generation_tokens_total", model=CHAT) == generated
    assert chat(http).status_code == 200  # and the server still serves


@pytest.fixture(scope="module")
def small_server(smollm2_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A server with one batch slot, no queue and an API key: for overload and auth."""
    env = {"FASTLLM_RUNTIME__MAX_QUEUE": "0", "FASTLLM_SERVER__API_KEYS": '["sk-test-1", "sk-test-2"]'}
    with run_server(["--model", str(smollm2_fp32), "--max-batch-size", "1"], env=env,
                    log_dir=tmp_path_factory.mktemp("small")) as running:
        yield running


def test_api_key_is_required_and_checked(small_server: Server) -> None:
    url = f"{small_server.url}/v1/chat/completions"
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 2}
    assert_openai_error(httpx.post(url, json=body), 401, code="invalid_api_key")
    assert_openai_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer sk-test-2"}, timeout=60).status_code == 200
    assert httpx.get(f"{small_server.url}/health").status_code == 200


def test_overload_gives_429_with_retry_after_then_recovers(small_server: Server) -> None:
    url = f"{small_server.url}/v1/chat/completions"
    headers = {"Authorization": "Bearer sk-test-1"}
    body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 60, "ignore_eos": True}
    results: list[httpx.Response] = []

    def send() -> None:
        results.append(httpx.post(url, json=body, headers=headers, timeout=120))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(r.status_code for r in results)
    assert 200 in statuses and 429 in statuses, statuses
    for response in results:
        if response.status_code == 429:
            assert_openai_error(response, 429)
            assert int(response.headers["retry-after"]) >= 1
        else:
            assert response.json()["usage"]["completion_tokens"] == 60
    assert httpx.post(url, json=body, headers=headers, timeout=120).status_code == 200


def test_sigterm_drains_in_flight_streams_and_exits_cleanly(smollm2_fp32: Path, tmp_path: Path) -> None:
    with run_server(["--model", str(smollm2_fp32)], log_dir=tmp_path) as running:
        body = {"model": CHAT, "messages": MESSAGES, "max_tokens": 40, "ignore_eos": True, "stream": True}
        events: list[str] = []
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 3:
                        running.process.send_signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has drained, as supervisors expect.
        assert running.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert re.search(r"draining", running.output())

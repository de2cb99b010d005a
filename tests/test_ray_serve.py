"""Two replicas on a local Ray instance (127.0.0.1), reached through Ray Serve's HTTP proxy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from serving import chat_and_embedding_config, run_server

pytest.importorskip("ray.serve", reason="the ray extra is not installed")


def replica_niceness() -> list[int]:
    """The niceness of each process Ray titled as one of our replicas."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ServeReplica:fastllm" in (proc / "cmdline").read_bytes():
                found.append(os.getpriority(os.PRIO_PROCESS, int(proc.name)))
        except OSError:  # gone meanwhile
            continue
    return found


def test_two_replicas_serve_chat_and_embeddings_through_the_proxy(smollm2_fp32: Path, minilm_export: Path,
                                                                  tmp_path: Path) -> None:
    config = chat_and_embedding_config(tmp_path, smollm2_fp32, minilm_export, "[runtime]\nthreads = 1\n")
    env = {"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        with run_server(["--config", str(config), "--ray", "2"], env=env, log_dir=tmp_path, ready_timeout=300,
                        cwd=tmp_path) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
            replicas: set[str] = set()
            for _ in range(12):
                raw = client.chat.completions.with_raw_response.create(
                    model="SmolLM2-135M-Instruct", temperature=0, max_tokens=12,
                    messages=[{"role": "user", "content": "What is the capital of France?"}])
                assert "Paris" in raw.parse().choices[0].message.content
                replicas.add(raw.headers["x-fastllm-replica"])
                embedded = client.embeddings.with_raw_response.create(model="all-MiniLM-L6-v2", input="a cat")
                assert len(embedded.parse().data[0].embedding) == 384
                replicas.add(embedded.headers["x-fastllm-replica"])
                if len(replicas) == 2:
                    break
            assert len(replicas) == 2, replicas
            assert httpx.get(f"{server.url}/ready").status_code == 200
            # Ray would start them at niceness 15, starved beside any ordinary process; they are the server.
            assert replica_niceness() == [os.getpriority(os.PRIO_PROCESS, 0)] * 2
            # A conversation's turns stay on one replica (its prefix cache); conversations spread over both.
            homes: dict[str, set[str]] = {}
            for turn in range(2):
                for session in (f"user-{i}" for i in range(12)):  # all 12 on one replica: a 1-in-2048 chance
                    raw = client.chat.completions.with_raw_response.create(
                        model="SmolLM2-135M-Instruct", temperature=0, max_tokens=2,
                        messages=[{"role": "user", "content": f"Hello, this is {session}, turn {turn}."}],
                        extra_headers={"x-session-id": session})
                    homes.setdefault(session, set()).add(raw.headers["x-fastllm-replica"])
            assert all(len(home) == 1 for home in homes.values()), homes
            assert len(set().union(*homes.values())) == 2, homes
    finally:
        subprocess.run(["ray", "stop", "--force"], capture_output=True)

"""Run the real server (`python -m fastllm serve`) on 127.0.0.1 for the tests, and stop it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chat_and_embedding_config(folder: Path, chat: Path, embedding: Path, extra: str = "") -> Path:
    """A config.toml serving ``chat`` and ``embedding`` (the latter as "all-MiniLM-L6-v2"), plus ``extra`` TOML."""
    config = folder / "config.toml"
    config.write_text(
        f'[model]\nmodel_id = "{chat}"\n\n'
        f'[[models]]\nmodel_id = "{embedding}"\nserved_model_name = "all-MiniLM-L6-v2"\n\n{extra}'
    )
    return config


class Server:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def run_server(args: list[str], *, env: dict[str, str] | None = None, log_dir: Path, ready_timeout: float = 180,
               subcommand: str | None = "serve", python: str = sys.executable, port: int | None = None,
               cwd: Path | None = None) -> Iterator[Server]:
    """Start the server; ``python`` and ``cwd`` let a test run another installation of FastLLM."""
    port = port or free_port()
    log = log_dir / f"server-{port}.log"
    command = [python, "-m", "fastllm", *([subcommand] if subcommand else []), "--port", str(port), *args]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=environment, cwd=cwd)
    server = Server(process, port, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {ready_timeout}s:\n{server.output()}")
            time.sleep(0.25)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

"""A HuggingFace Hub on loopback, with just the API `huggingface_hub.snapshot_download` uses.

Endpoints (as huggingface_hub 0.3x calls them):

* ``GET /api/models/{repo}/revision/{rev}`` -> ``{"id", "sha", "siblings": [{"rfilename"}], ...}``
* ``HEAD|GET /{repo}/resolve/{rev}/{file}`` -> the bytes, with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` (what ``get_hf_file_metadata`` reads to name the cache blob and check the size).

Errors carry ``X-Error-Code`` like the real hub, which is how huggingface_hub picks its exception:
``RepoNotFound`` (404), ``RevisionNotFound`` (404), ``EntryNotFound`` (404) and ``GatedRepo``
(401 without a token, 403 with a wrong one). As on the real hub, a gated repo's listing is public
and only its files are refused.

Also here: ``run_fastllm``, the real CLI in a subprocess, for tests that check exit codes and stderr.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    token: str | None = None  # gated: files need "Authorization: Bearer <token>"

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, refs: tuple[str, ...] = ("main",),
                   token: str | None = None) -> str:
        """Add a commit holding ``files``; ``refs`` (branches or tags) then point at it. Returns its sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        for ref in refs:
            repo.refs[ref] = sha
        if token is not None:
            repo.token = token
        return sha

    def downloaded(self, repo_id: str) -> list[str]:
        """Files of ``repo_id`` fetched with GET (in request order)."""
        prefix = f"/{repo_id}/resolve/"
        return [r.path[len(prefix):].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and r.path.startswith(prefix)]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

            def do_GET(self) -> None:
                self._route(body=True)

            def do_HEAD(self) -> None:
                self._route(body=False)

            def _route(self, *, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append(Request(self.command, path, self.headers.get("Authorization")))
                if path.startswith("/api/models/"):
                    self._api(path[len("/api/models/"):])
                elif "/resolve/" in path:
                    self._resolve(path.lstrip("/"), body=body)
                else:
                    self._error(404, None, "Not found")

            def _api(self, rest: str) -> None:
                if "/revision/" in rest:
                    repo_id, revision = rest.split("/revision/", 1)
                else:
                    repo_id, revision = rest, "main"
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return
                sha = repo.resolve(revision)
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return
                self._json(200, {
                    "_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                    "gated": "manual" if repo.token else False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": ["transformers"], "library_name": "transformers",
                    "lastModified": "2025-01-01T00:00:00.000Z",
                    "siblings": [{"rfilename": name} for name in sorted(repo.commits[sha])],
                })

            def _resolve(self, path: str, *, body: bool) -> None:
                repo_part, rest = path.split("/resolve/", 1)
                repo = hub.repos.get(repo_part)
                if repo is None:
                    self._error(404, "RepoNotFound", "Repository not found")
                    return
                revision, _, filename = rest.partition("/")
                if repo.token is not None:
                    auth = self.headers.get("Authorization")
                    if auth is None:
                        self._error(401, "GatedRepo", "Access to this model is restricted; you must be authenticated")
                        return
                    if auth != f"Bearer {repo.token}":
                        self._error(403, "GatedRepo", "Access to this model is restricted and you are not in the "
                                                      "authorized list")
                        return
                sha = repo.resolve(revision)
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    return
                data = repo.commits[sha].get(filename)
                if data is None:
                    self._error(404, "EntryNotFound", f"{filename} does not exist at {revision}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", sha)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _error(self, status: int, code: str | None, message: str) -> None:
                headers = {"X-Error-Message": message}
                if code:
                    headers["X-Error-Code"] = code
                self._json(status, {"error": message}, headers)

        return Handler


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative posix names), as a repo commit would hold them."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def hub_env(tmp: Path, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a CLI subprocess: a fresh HF cache, no token, hub pointed at ``endpoint``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="10", PYTHONUNBUFFERED="1")
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    env.update(extra)
    return env


def run_fastllm(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                prelude: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m fastllm ARGS`` (the real CLI); ``prelude`` is Python run first in that process
    (e.g. ``sys.modules['optimum'] = None`` to make a module unimportable)."""
    argv = [str(a) for a in args]
    if prelude:
        code = f"import sys\n{prelude}\nsys.argv = ['fastllm', *{argv!r}]\nfrom fastllm.cli import main\nmain()\n"
        command = [sys.executable, "-c", code]
    else:
        command = [sys.executable, "-m", "fastllm", *argv]
    environment = dict(env if env is not None else os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 1 and exactly one ``error:`` line on stderr naming the problem, never a traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]

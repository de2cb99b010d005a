"""Soak a running FastLLM server with mixed load, and fail unless it stayed correct and clean.

    python scripts/soak.py --url http://127.0.0.1:3000 --requests 500 --concurrency 16

``concurrency`` clients at a time send greedy chat requests (plain and streamed), embeddings, streams
they hang up on after a few chunks, and bad requests. Greedy answers are known in advance (each
prompt is asked alone first), so every completed request can be checked exactly. The run passes
only when:

* no response is a 5xx, no stream carries an error event, no request fails in transport;
* plain answers equal the reference, streamed deltas concatenate to it and end with ``[DONE]``;
* embeddings have the model's dimension, norm 1, and match the reference vector;
* bad requests get their 4xx in OpenAI's error shape;
* afterwards nothing is queued or running, and ``fastllm_requests_total`` grew by exactly what the
  clients saw per route and status;
* resident memory of the server process after the run is within 5% of what it was after a warm-up
  round (needs the PID: ``--pid``, or found from the listening port when the server is local).

Only loopback or the given URL is contacted; the run is bounded by ``--requests`` and per-request
timeouts. ``tests/test_reliability_soak.py`` imports ``run_soak`` and runs it at a small size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2+2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Write one sentence about the sea.",
]
KNOWN_ANSWERS = {"What is the capital of France?": "Paris"}  # checked when max_tokens leaves room for it
EMBED_TEXTS = ["a cat", "The food was delicious.", "How do I bake bread?", "Stock markets fell today.",
               "Un texte en français, avec des accents.", "emoji 🍂 and symbols ∑"]

KINDS = ("chat", "stream", "embed", "disconnect", "bad")
DEFAULT_MIX = {"chat": 0.3, "stream": 0.3, "embed": 0.2, "disconnect": 0.1, "bad": 0.1}

CHAT_ROUTE, EMBED_ROUTE, COMPLETIONS_ROUTE = "/v1/chat/completions", "/v1/embeddings", "/v1/completions"


@dataclass
class SoakConfig:
    url: str = "http://127.0.0.1:3000"
    requests: int = 120
    concurrency: int = 16
    max_tokens: int = 8
    chat_model: str | None = None  # found from /v1/models when not given
    embed_model: str | None = None
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    warmup: int | None = None  # requests in the warm-up round; default max(2 * concurrency, requests // 5)
    pid: int | None = None  # server process, for resident memory; found from the port when local
    rss_tolerance: float = 0.05
    timeout: float = 120.0  # per request
    settle_timeout: float = 30.0  # for the server to empty its queue and batch after the run
    api_key: str | None = None


@dataclass
class Reference:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class Report:
    requests: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)  # (route, status) as clients saw them
    kinds: Counter[str] = field(default_factory=Counter)
    disconnects: int = 0
    embedded_inputs: int = 0
    failures: list[str] = field(default_factory=list)
    rss_before_kb: int | None = None
    rss_after_kb: int | None = None
    duration_s: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def errors_by_status(self) -> dict[int, int]:
        counts: Counter[int] = Counter()
        for (_, status), count in self.statuses.items():
            if status >= 400:
                counts[status] += count
        return dict(sorted(counts.items()))

    def summary(self) -> str:
        lines = [
            f"requests:    {self.requests} in {self.duration_s:.1f}s "
            f"({self.requests / max(self.duration_s, 1e-9):.1f}/s)",
            f"kinds:       {dict(sorted(self.kinds.items()))}",
            f"statuses:    {', '.join(f'{r} {s}: {n}' for (r, s), n in sorted(self.statuses.items()))}",
            f"errors:      {self.errors_by_status() or 'none'} (4xx from the bad-input share)",
            f"disconnects: {self.disconnects}",
        ]
        for kind, values in sorted(self.latencies.items()):
            values = sorted(values)
            lines.append(f"latency {kind:<10} p50 {values[len(values) // 2]:.2f}s  max {values[-1]:.2f}s")
        if self.rss_before_kb is not None and self.rss_after_kb is not None:
            change = (self.rss_after_kb - self.rss_before_kb) / self.rss_before_kb
            lines.append(f"server RSS:  {self.rss_before_kb / 1024:.0f} MiB after warm-up, "
                         f"{self.rss_after_kb / 1024:.0f} MiB after the run ({change:+.1%})")
        else:
            lines.append("server RSS:  not measured (server PID unknown)")
        lines.append("result:      " + ("PASS" if self.ok else f"FAIL ({len(self.failures)} problems)"))
        lines.extend(f"  - {failure}" for failure in self.failures[:50])
        return "\n".join(lines)


# ---- server facts: /metrics, resident memory ---------------------------------------------------

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = frozenset(_LABEL.findall(match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def request_counts(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> Counter[tuple[str, int]]:
    counts: Counter[tuple[str, int]] = Counter()
    for (name, labels), value in samples.items():
        if name == "fastllm_requests_total":
            label = dict(labels)
            counts[(label["route"], int(label["status"]))] += int(value)
    return counts


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def listening_pid(port: int) -> int | None:
    """The local process listening on ``port`` (Linux /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(parts[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return int(proc.name)
        except OSError:
            continue
    return None


# ---- one request of each kind --------------------------------------------------------------------


class Soak:
    def __init__(self, config: SoakConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.report = Report()
        self.references: dict[str, Reference] = {}
        self.vectors: dict[str, list[float]] = {}
        self.chat_model = config.chat_model or ""
        self.embed_model = config.embed_model or ""

    def fail(self, message: str) -> None:
        self.report.failures.append(message)

    def seen(self, route: str, status: int) -> None:
        self.report.statuses[(route, status)] += 1

    def chat_body(self, prompt: str, **extra: object) -> dict[str, object]:
        return {"model": self.chat_model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                "max_tokens": self.config.max_tokens, **extra}

    async def discover(self) -> None:
        if self.chat_model and self.embed_model:
            return
        response = await self.client.get("/v1/models")
        response.raise_for_status()
        for card in response.json()["data"]:
            if card.get("task") == "text-generation" and not self.chat_model:
                self.chat_model = card["id"]
            elif card.get("task") == "embedding" and not self.embed_model:
                self.embed_model = card["id"]
        if not self.chat_model or not self.embed_model:
            raise RuntimeError(f"the server must serve a chat and an embedding model; it serves {response.text}")

    async def prepare(self) -> None:
        """Ask every prompt alone (greedy): the answers every later request must reproduce."""
        for prompt in CHAT_PROMPTS:
            response = await self.client.post(CHAT_ROUTE, json=self.chat_body(prompt))
            response.raise_for_status()
            body = response.json()
            choice = body["choices"][0]
            self.references[prompt] = Reference(choice["message"]["content"], choice["finish_reason"],
                                                body["usage"]["completion_tokens"])
        for prompt, answer in KNOWN_ANSWERS.items():
            if self.config.max_tokens >= 8 and answer not in self.references[prompt].text:
                self.fail(f"greedy answer to {prompt!r} lacks {answer!r}: {self.references[prompt].text!r}")
        response = await self.client.post(EMBED_ROUTE, json={"model": self.embed_model, "input": EMBED_TEXTS})
        response.raise_for_status()
        for text, item in zip(EMBED_TEXTS, response.json()["data"], strict=True):
            self.vectors[text] = item["embedding"]

    async def one(self, kind: str, rng: random.Random) -> None:
        started = time.perf_counter()
        try:
            await getattr(self, f"_{kind}")(rng)
        except httpx.HTTPError as exc:
            self.fail(f"{kind}: transport error {type(exc).__name__}: {exc}")
        self.report.kinds[kind] += 1
        self.report.latencies.setdefault(kind, []).append(time.perf_counter() - started)

    async def _chat(self, rng: random.Random) -> None:
        prompt = rng.choice(CHAT_PROMPTS)
        response = await self.client.post(CHAT_ROUTE, json=self.chat_body(prompt))
        self.seen(CHAT_ROUTE, response.status_code)
        if response.status_code != 200:
            self.fail(f"chat {prompt!r}: {response.status_code} {response.text[:200]}")
            return
        body, ref = response.json(), self.references[prompt]
        choice = body["choices"][0]
        if (choice["message"]["content"], choice["finish_reason"]) != (ref.text, ref.finish_reason):
            self.fail(f"chat {prompt!r}: got {choice['message']['content']!r} ({choice['finish_reason']}), "
                      f"expected {ref.text!r} ({ref.finish_reason})")
        if body["usage"]["completion_tokens"] != ref.completion_tokens:
            self.fail(f"chat {prompt!r}: {body['usage']['completion_tokens']} completion tokens, "
                      f"expected {ref.completion_tokens}")

    async def _stream(self, rng: random.Random) -> None:
        prompt = rng.choice(CHAT_PROMPTS)
        body = self.chat_body(prompt, stream=True, stream_options={"include_usage": True})
        events: list[str] = []
        async with self.client.stream("POST", CHAT_ROUTE, json=body) as response:
            self.seen(CHAT_ROUTE, response.status_code)
            if response.status_code != 200:
                await response.aread()
                self.fail(f"stream {prompt!r}: {response.status_code} {response.text[:200]}")
                return
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
        ref = self.references[prompt]
        if not events or events[-1] != "[DONE]":
            self.fail(f"stream {prompt!r}: did not end with [DONE] (last event {events[-1:]})")
            return
        chunks = [json.loads(event) for event in events[:-1]]
        if errors := [c["error"] for c in chunks if "error" in c]:
            self.fail(f"stream {prompt!r}: error event {errors[0]}")
            return
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        text = "".join(choice["delta"].get("content") or "" for choice in choices)
        finishes = [choice["finish_reason"] for choice in choices if choice["finish_reason"]]
        usage = chunks[-1].get("usage") or {}
        if text != ref.text or finishes != [ref.finish_reason]:
            self.fail(f"stream {prompt!r}: deltas give {text!r} ({finishes}), expected {ref.text!r} "
                      f"([{ref.finish_reason!r}])")
        if usage.get("completion_tokens") != ref.completion_tokens:
            self.fail(f"stream {prompt!r}: usage {usage}, expected {ref.completion_tokens} completion tokens")

    async def _embed(self, rng: random.Random) -> None:
        texts = rng.sample(EMBED_TEXTS, rng.randint(1, 3))
        response = await self.client.post(EMBED_ROUTE, json={"model": self.embed_model, "input": texts})
        self.seen(EMBED_ROUTE, response.status_code)
        if response.status_code != 200:
            self.fail(f"embeddings: {response.status_code} {response.text[:200]}")
            return
        data = response.json()["data"]
        if [d["index"] for d in data] != list(range(len(texts))):
            self.fail(f"embeddings: indexes {[d['index'] for d in data]} for {len(texts)} inputs")
            return
        self.report.embedded_inputs += len(texts)
        for text, item in zip(texts, data, strict=True):
            vector, ref = item["embedding"], self.vectors[text]
            norm = math.sqrt(sum(x * x for x in vector))
            cosine = sum(a * b for a, b in zip(vector, ref, strict=False)) / max(norm, 1e-12)
            if len(vector) != len(ref) or abs(norm - 1) > 1e-3 or cosine < 0.999:
                self.fail(f"embeddings {text!r}: dimension {len(vector)} (expected {len(ref)}), norm {norm:.5f}, "
                          f"cosine to the reference {cosine:.5f}")

    async def _disconnect(self, rng: random.Random) -> None:
        """A stream that would run long, abandoned after a few chunks."""
        # Long enough that a slot the server failed to free would still be busy when the run settles.
        body = self.chat_body(rng.choice(CHAT_PROMPTS), stream=True, ignore_eos=True, max_tokens=2000,
                              temperature=0.8, seed=rng.randrange(1000))
        wanted = rng.randint(1, 3)
        async with self.client.stream("POST", CHAT_ROUTE, json=body) as response:
            self.seen(CHAT_ROUTE, response.status_code)
            if response.status_code != 200:
                self.fail(f"disconnect: {response.status_code}")
                return
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data:")
                if seen >= wanted:
                    break
        # Leaving the block before the body is read closes the connection: the server sees the client go.
        self.report.disconnects += 1

    async def _bad(self, rng: random.Random) -> None:
        route, content, status = rng.choice(self.bad_requests())
        response = await self.client.post(route, content=content, headers={"content-type": "application/json"})
        self.seen(route, response.status_code)
        if response.status_code != status:
            self.fail(f"bad input {content[:80]!r} to {route}: {response.status_code}, expected {status}")
            return
        try:
            error = response.json()["error"]
            shaped = set(error) == {"message", "type", "param", "code"} and bool(error["message"])
        except (ValueError, KeyError, TypeError):
            shaped = False
        if not shaped:
            self.fail(f"bad input to {route}: {status} not in OpenAI's error shape: {response.text[:200]}")

    def bad_requests(self) -> list[tuple[str, bytes, int]]:
        chat, embed = self.chat_model, self.embed_model
        message = [{"role": "user", "content": "hi"}]

        def dumps(value: object) -> bytes:
            return json.dumps(value).encode()

        return [
            (CHAT_ROUTE, b'{"model": "x", "messages": [', 400),
            (CHAT_ROUTE, dumps({"model": chat, "messages": []}), 400),
            (CHAT_ROUTE, dumps({"model": chat, "messages": message, "temperature": 9}), 400),
            (CHAT_ROUTE, dumps({"model": chat, "messages": message, "max_tokens": 10**9}), 400),
            (CHAT_ROUTE, dumps({"model": "no-such-model", "messages": message}), 404),
            (CHAT_ROUTE, b'{"model": "%s", "messages": [], "top_p": NaN}' % chat.encode(), 400),
            (CHAT_ROUTE, b"[]", 400),
            (COMPLETIONS_ROUTE, dumps({"model": chat, "prompt": [1, 2, 10**9]}), 400),
            (EMBED_ROUTE, dumps({"model": embed, "input": ""}), 400),
            (EMBED_ROUTE, dumps({"model": chat, "input": "hello"}), 400),
        ]


# ---- the run --------------------------------------------------------------------------------------


def plan(count: int, mix: dict[str, float], rng: random.Random) -> list[str]:
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    return rng.choices(kinds, weights=[mix[k] for k in kinds], k=count)


async def _round(soak: Soak, kinds: list[str], concurrency: int, rng: random.Random) -> None:
    gate = asyncio.Semaphore(concurrency)
    seeds = [rng.randrange(2**32) for _ in kinds]

    async def guarded(kind: str, seed: int) -> None:
        async with gate:
            await soak.one(kind, random.Random(seed))

    await asyncio.gather(*(guarded(k, s) for k, s in zip(kinds, seeds, strict=True)))


async def _settle(soak: Soak) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Wait until nothing is queued, running or in flight (the /metrics request itself aside)."""
    deadline = time.monotonic() + soak.config.settle_timeout
    while True:
        samples = parse_metrics((await soak.client.get("/metrics")).text)
        busy = {
            "queued": metric(samples, "fastllm_queue_depth"),
            "running": metric(samples, "fastllm_batch_size"),
            "in flight": metric(samples, "fastllm_requests_in_flight") - 1,
        }
        if not any(busy.values()):
            return samples
        if time.monotonic() > deadline:
            soak.fail(f"the server did not settle within {soak.config.settle_timeout:.0f}s: {busy}")
            return samples
        await asyncio.sleep(0.2)


async def run_soak(config: SoakConfig) -> Report:
    """Run the soak against ``config.url`` and return what happened; ``report.ok`` says whether it passed."""
    rng = random.Random(config.seed)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    pid = config.pid
    if pid is None and urlsplit(config.url).hostname in ("127.0.0.1", "localhost", "::1"):
        pid = listening_pid(urlsplit(config.url).port or 80)
    limits = httpx.Limits(max_connections=config.concurrency + 2, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(base_url=config.url, timeout=config.timeout, limits=limits,
                                 headers=headers) as client:
        soak = Soak(config, client)
        await soak.discover()
        await soak.prepare()
        warmup = config.warmup if config.warmup is not None else max(2 * config.concurrency, config.requests // 5)
        await _round(soak, plan(warmup, config.mix, rng), config.concurrency, rng)

        before = await _settle(soak)
        soak.report = Report(failures=soak.report.failures)  # the warm-up's problems count, its numbers do not
        report = soak.report
        report.rss_before_kb = rss_kb(pid) if pid else None
        embedded_before = metric(before, "fastllm_embedding_inputs_total", model=soak.embed_model)
        started = time.perf_counter()
        await _round(soak, plan(config.requests, config.mix, rng), config.concurrency, rng)
        report.duration_s = time.perf_counter() - started
        report.requests = sum(report.kinds.values())
        after = await _settle(soak)
        report.rss_after_kb = rss_kb(pid) if pid else None

    for (route, status), count in sorted(report.statuses.items()):
        if status >= 500:
            soak.fail(f"{count} responses from {route} were {status}")
    counted = request_counts(after)
    counted.subtract(request_counts(before))
    server = {key: n for key, n in counted.items() if key[0].startswith("/v1/") and n}
    if server != dict(report.statuses):
        soak.fail(f"fastllm_requests_total grew by {dict(sorted(server.items()))}, "
                  f"but the clients saw {dict(sorted(report.statuses.items()))}")
    embedded = metric(after, "fastllm_embedding_inputs_total", model=soak.embed_model) - embedded_before
    if embedded != report.embedded_inputs:
        soak.fail(f"fastllm_embedding_inputs_total grew by {embedded:.0f}; the clients embedded "
                  f"{report.embedded_inputs} inputs")
    if report.rss_before_kb and report.rss_after_kb:
        growth = (report.rss_after_kb - report.rss_before_kb) / report.rss_before_kb
        if growth > config.rss_tolerance:
            soak.fail(f"server RSS grew {growth:.1%} ({report.rss_before_kb} kB → {report.rss_after_kb} kB), "
                      f"more than {config.rss_tolerance:.0%}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("FASTLLM_SOAK_URL", "http://127.0.0.1:3000"),
                        help="Server to soak (default %(default)s).")
    parser.add_argument("--requests", type=int, default=500,
                        help="Requests in the measured round (default %(default)s).")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="Requests in flight at once (default %(default)s).")
    parser.add_argument("--max-tokens", type=int, default=8,
                        help="max_tokens of the checked chat requests (default %(default)s).")
    parser.add_argument("--chat-model", help="Chat model id (default: the first text-generation model served).")
    parser.add_argument("--embed-model", help="Embedding model id (default: the first embedding model served).")
    parser.add_argument("--pid", type=int, help="Server PID for resident memory (default: found from the port).")
    parser.add_argument("--warmup", type=int, help="Requests in the warm-up round (default: max(2 x concurrency, "
                                                   "requests / 5)).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the request mix.")
    parser.add_argument("--api-key", default=os.environ.get("FASTLLM_API_KEY"), help="Bearer key, if required.")
    args = parser.parse_args(argv)
    config = SoakConfig(url=args.url, requests=args.requests, concurrency=args.concurrency,
                        max_tokens=args.max_tokens, chat_model=args.chat_model, embed_model=args.embed_model,
                        pid=args.pid, warmup=args.warmup, seed=args.seed, api_key=args.api_key)
    report = asyncio.run(run_soak(config))
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

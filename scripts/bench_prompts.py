"""Long prompts and conversations against any OpenAI-compatible server: what agents, RAG and chats send.

    python scripts/bench_prompts.py http://127.0.0.1:3000/v1 --label fastllm --json a.json
    python scripts/bench_prompts.py --merge a.json --merge b.json --markdown out.md

For each prompt size (256, 1k, 2k, 4k tokens, as the server counts them): time to first token of a prompt the
server has never seen (cold), then of the same long system prompt with a new question (warm: what prefix
caching saves). Then a 10-turn chat, each turn resending the history with the model's last answer. Then decoding
under a long arrival: 4 streams run, a 2k-token prompt arrives, and the streams' gaps between tokens while it is
read are set against their gaps before (what chunked prefill protects). Every request opens a fresh connection (one
llama.cpp server dropped kept-alive connections after a stream), streams, and is timed from the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import time
from typing import Any

import bench_reports
import httpx

WORDS = [
    "river", "stone", "market", "lantern", "harbor", "winter", "garden", "engine", "letter", "mountain", "signal",
    "window", "copper", "meadow", "archive", "violin", "compass", "orchard", "bridge", "thunder", "pepper", "canyon",
    "ribbon", "falcon", "glacier", "theater", "basket", "planet", "quarry", "saddle", "temple", "walnut", "anchor",
    "blanket", "castle", "desert", "feather", "island", "jungle", "kettle", "ladder", "mirror", "needle", "oyster",
    "pillow", "rocket", "shadow", "tunnel", "valley", "wagon", "yogurt", "zipper",
]
SIZES = (256, 1024, 2048, 4096)


def passage(words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < words:
        length = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
        count += length
    return " ".join(sentences)


async def stream(url: str, model: str, messages: list[dict[str, str]], max_tokens: int,
                 ignore_eos: bool = False, arrivals: list[float] | None = None) -> dict[str, Any]:
    """One streamed chat completion on a fresh connection: TTFT, the answer, usage; each token's arrival time
    goes to ``arrivals`` as it comes (so a cancelled stream keeps what it saw)."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    first, text, usage = 0.0, "", {}
    arrivals = [] if arrivals is None else arrivals
    # The client is made before the clock starts: making one builds an SSL context (30-50 ms on a 2-core machine),
    # which is the benchmark's cost, not the server's. The connection itself is still opened inside the timing.
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        now = time.perf_counter()
                        first = first or now
                        arrivals.append(now)
                        text += piece
    return {"ttft": first - started, "sent": started, "text": text, "usage": usage}


class Sizer:
    """How many words of ``passage`` make a prompt of a given size with this server's tokenizer and chat template,
    from its own count (``usage.prompt_tokens``) of two prompts: the template and question around a one-word system
    prompt, and around a 400-word one."""

    def __init__(self, overhead: int, tokens_per_word: float) -> None:
        self.overhead, self.tokens_per_word = overhead, tokens_per_word

    @classmethod
    async def measure(cls, url: str, model: str) -> Sizer:
        async def count(system: str) -> int:
            body = {"model": model, "messages": [{"role": "system", "content": system}, _question(0)],
                    "max_tokens": 1, "temperature": 0}
            async with httpx.AsyncClient(timeout=600) as client:
                response = await client.post(f"{url}/chat/completions", json=body)
                response.raise_for_status()
                return int(response.json()["usage"]["prompt_tokens"])

        text = passage(400, seed=1)
        bare, full = await count(WORDS[0]), await count(text)
        return cls(bare, (full - bare) / (len(text.split()) - 1))

    def words(self, tokens: int) -> int:
        return max(1, round((tokens - self.overhead) / self.tokens_per_word))


def _question(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"In one sentence, which word of the text above comes up most? ({i})"}


async def prompt_sizes(url: str, model: str, sizes: list[int], sizer: Sizer, repeat: int) -> list[dict[str, Any]]:
    """Each size ``repeat`` times, a new long system prompt each time, and the medians: one cold read of 256 tokens
    is a few hundred milliseconds, which this machine's drift moves by a third from one sample to the next."""
    rows = []
    for size in sizes:
        colds, warms = [], []
        for i in range(repeat):
            system = {"role": "system", "content": passage(sizer.words(size), seed=size + 7919 * i + int(time.time()))}
            colds.append(await stream(url, model, [system, _question(0)], 8))
            warms.append(await stream(url, model, [system, _question(1)], 8))
        cold, warm = bench_reports.median_run(colds, "ttft"), bench_reports.median_run(warms, "ttft")
        rows.append({"size": size, "prompt_tokens": cold["usage"].get("prompt_tokens"), "cold_ttft": cold["ttft"],
                     "warm_ttft": warm["ttft"], "cold_ttfts": [r["ttft"] for r in colds],
                     "warm_ttfts": [r["ttft"] for r in warms],
                     "warm_cached": (warm["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")})
        print(f"  {size}: cold {cold['ttft']:.2f}s, warm {warm['ttft']:.2f}s (medians of {repeat})", flush=True)
    return rows


async def conversation(url: str, model: str, turns: int) -> list[dict[str, Any]]:
    messages = [{"role": "system", "content": passage(350, seed=int(time.time()))}]
    rows = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Turn {turn}: name one object from the text and say why."})
        reply = await stream(url, model, messages, 32)
        messages.append({"role": "assistant", "content": reply["text"]})
        rows.append({"turn": turn + 1, "prompt_tokens": reply["usage"].get("prompt_tokens"), "ttft": reply["ttft"]})
    print(f"  chat: turn 1 {rows[0]['ttft']:.2f}s, turn {turns} {rows[-1]['ttft']:.2f}s", flush=True)
    return rows


async def arrival(url: str, model: str, streams: int, long_tokens: int, sizer: Sizer) -> dict[str, Any]:
    """Gaps between tokens of ``streams`` running streams, before and while a long prompt is read."""
    ask = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    running = [asyncio.create_task(stream(url, model, ask, 4000, ignore_eos=True, arrivals=mine)) for mine in arrivals]
    while min(len(mine) for mine in arrivals) < 50:  # every stream is decoding steadily
        await asyncio.sleep(0.05)
    system = {"role": "system", "content": passage(sizer.words(long_tokens), seed=int(time.time()))}
    long = await stream(url, model, [system, _question(0)], 4)
    sent, read = long["sent"], long["sent"] + long["ttft"]
    await asyncio.sleep(0.5)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    gaps = [pair for mine in arrivals for pair in itertools.pairwise(mine)]
    before = [b - a for a, b in gaps if b < sent]
    during = [b - a for a, b in gaps if b > sent and a < read]
    print(f"  arrival: gaps p50/p95 {_pct(before, 50) * 1000:.0f}/{_pct(before, 95) * 1000:.0f} ms before, "
          f"p50/p95/max {_pct(during, 50) * 1000:.0f}/{_pct(during, 95) * 1000:.0f}/"
          f"{max(during, default=0.0) * 1000:.0f} ms while {long_tokens} tokens are read in "
          f"{long['ttft']:.2f} s", flush=True)
    return {"streams": streams, "long_prompt_tokens": long["usage"].get("prompt_tokens"),
            "long_ttft": long["ttft"], "itl_before_p50": _pct(before, 50), "itl_before_p95": _pct(before, 95),
            "itl_during_p50": _pct(during, 50), "itl_during_p95": _pct(during, 95),
            "itl_during_max": max(during, default=0.0)}


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else (values[0] if values else 0.0)


def _ms_per_token(row: dict[str, Any]) -> float:
    return row["cold_ttft"] * 1000 / row["prompt_tokens"] if row["prompt_tokens"] else 0.0


def markdown(reports: list[dict[str, Any]]) -> str:
    lines = ["Cold and warm TTFTs are medians of each server's reads of every size (`--repeat`, a new system prompt "
             "each time).", "", "| server | prompt tokens | cold TTFT (ms per prompt token) | warm TTFT (same system "
             "prompt, new question) |", "|---|---|---|---|"]
    for report in reports:
        for row in report["sizes"]:
            lines.append(f"| {report['label']} | {row['prompt_tokens']} | {row['cold_ttft']:.2f} s "
                         f"({_ms_per_token(row):.2f}) | {row['warm_ttft']:.2f} s |")
    lines += ["", "| server | cold ms per prompt token, shortest prompt → longest | longest ÷ shortest |",
              "|---|---|---|"]
    for report in reports:
        rows = [row for row in report["sizes"] if row["prompt_tokens"]]
        if len(rows) >= 2:
            first, last = _ms_per_token(rows[0]), _ms_per_token(rows[-1])
            lines.append(f"| {report['label']} | {first:.2f} ({rows[0]['prompt_tokens']} tokens) → {last:.2f} "
                         f"({rows[-1]['prompt_tokens']} tokens) | {last / first:.2f}× |")
    lines += ["", "| server | chat turn 1 TTFT (prompt tokens) | last turn's TTFT (prompt tokens) |", "|---|---|---|"]
    for report in reports:
        chat = report["chat"]
        if not chat:
            continue
        lines.append(f"| {report['label']} | {chat[0]['ttft']:.2f} s ({chat[0]['prompt_tokens']}) "
                     f"| turn {chat[-1]['turn']}: {chat[-1]['ttft']:.2f} s ({chat[-1]['prompt_tokens']}) |")
    lines += ["", "| server | running streams | gap p50 / p95 before | gap p50 / p95 / max while a "
              "long prompt is read | its TTFT |", "|---|---|---|---|---|"]
    for report in reports:
        a = report["arrival"]
        if a is None:
            continue
        lines.append(f"| {report['label']} | {a['streams']} | {a['itl_before_p50'] * 1000:.0f} / "
                     f"{a['itl_before_p95'] * 1000:.0f} ms | {a['itl_during_p50'] * 1000:.0f} / "
                     f"{a['itl_during_p95'] * 1000:.0f} / {a['itl_during_max'] * 1000:.0f} ms "
                     f"({a['long_prompt_tokens']} tokens) | {a['long_ttft']:.2f} s |")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        model = args.model or (await client.get(f"{args.url}/models")).json()["data"][0]["id"]
    print(f"{args.label}: {model} at {args.url}", flush=True)
    parts = set(args.parts.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    sizer = await Sizer.measure(args.url, model)
    return {"label": args.label, "model": model,
            "sizes": await prompt_sizes(args.url, model, sizes, sizer, args.repeat) if "sizes" in parts else [],
            "chat": await conversation(args.url, model, args.turns) if "chat" in parts else [],
            "arrival": await arrival(args.url, model, args.streams, args.arrival_tokens, sizer) if "arrival" in parts
            else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_reports.add_options(parser)
    parser.add_argument("--model")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeat", type=int, default=3, help="cold and warm reads of each size; medians are kept")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--arrival-tokens", type=int, default=2048)
    parser.add_argument("--parts", default="sizes,chat,arrival", help="which measurements to run")
    args = parser.parse_args()
    bench_reports.finish(args, lambda: asyncio.run(run(args)), markdown)


if __name__ == "__main__":
    main()

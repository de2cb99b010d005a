"""Embeddings under load, with inputs of mixed lengths: what batching across requests by length is for.

    python scripts/bench_embeddings.py http://127.0.0.1:3000/v1 --model all-MiniLM-L6-v2

Three levels, three rounds each (the median is printed): one client sending one input per request, one client
sending 32, and 8 clients sending 32 each. Inputs run from 4 to 120 words, drawn from a fixed pool, so a batch
cut from queued inputs in arrival order pads every row to the longest; sorted by length, rows pad little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx

WORDS = ["river", "stone", "market", "lantern", "harbor", "winter", "garden", "engine", "letter", "mountain", "signal",
         "window", "copper", "meadow"]


# (clients, inputs per request, requests per client)
LEVELS = ((1, 1, 200), (1, 32, 20), (8, 32, 8))


def pool(size: int = 512, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([4, 8, 12, 20, 40, 80, 120]))) for _ in range(size)]


async def client(url: str, model: str, inputs: list[str], index: int, requests: int, batch: int) -> int:
    sent = 0
    async with httpx.AsyncClient(timeout=600) as http:
        for i in range(requests):
            chosen = [inputs[(index * 97 + i * 31 + j) % len(inputs)] for j in range(batch)]
            response = await http.post(f"{url}/embeddings", json={"model": model, "input": chosen})
            response.raise_for_status()
            sent += batch
    return sent


async def level(url: str, model: str, inputs: list[str], clients: int, batch: int, requests: int) -> float:
    started = time.perf_counter()
    sent = await asyncio.gather(*(client(url, model, inputs, c, requests, batch) for c in range(clients)))
    return sum(sent) / (time.perf_counter() - started)


async def main(url: str, model: str, json_path: str | None) -> None:
    inputs = pool()
    await level(url, model, inputs, 1, 8, 2)  # warm-up
    medians: dict[str, float] = {}
    for clients, batch, requests in LEVELS:
        rates = sorted([await level(url, model, inputs, clients, batch, requests) for _ in range(3)])
        print(f"{clients} client(s) x batch {batch}: {rates[1]:.0f} inputs/s (rounds {[round(r) for r in rates]})")
        medians[f"{clients}x{batch}"] = round(rates[1], 1)
    if json_path:
        Path(json_path).write_text(json.dumps({"url": url, "model": model, "inputs_per_s": medians}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--json", help="write the medians here")
    args = parser.parse_args()
    asyncio.run(main(args.url.rstrip("/"), args.model, args.json))

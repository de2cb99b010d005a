"""Speculative decoding, one client, against any OpenAI-compatible server: where answers repeat the prompt, and not.

    python scripts/bench_speculative.py http://127.0.0.1:3000/v1 --label "fastllm ngram" --json a.json
    python scripts/bench_speculative.py --merge a.json --merge b.json --markdown out.md

Two prompts, greedy, streamed, each on a fresh connection, ``--repeat`` times (the median is kept): a code edit
(rewrite a given 40-line function with one change: most of the answer copies the prompt, which prompt lookup
drafts) and an open chat question (nothing to copy: what speculation must not slow down). Decode speed is the
answer's tokens over the time from its first token to its last; the answers themselves are kept, so runs of one
model with speculation on and off can be compared token for token.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import bench_reports
import httpx

FUNCTION = '''def load_inventory(path, warehouse=None, include_archived=False):
    """Read an inventory CSV export and return the items, grouped by warehouse."""
    import csv
    from collections import defaultdict

    grouped = defaultdict(list)
    skipped = 0
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if not row.get("sku"):
                skipped += 1
                continue
            if row.get("archived") == "yes" and not include_archived:
                continue
            if warehouse is not None and row.get("warehouse") != warehouse:
                continue
            try:
                quantity = int(row.get("quantity", "0"))
            except ValueError:
                skipped += 1
                continue
            price = float(row.get("unit_price") or 0.0)
            item = {
                "sku": row["sku"].strip().upper(),
                "name": row.get("name", "").strip(),
                "quantity": quantity,
                "unit_price": round(price, 2),
                "value": round(price * quantity, 2),
                "location": row.get("bin", "unknown"),
            }
            grouped[row.get("warehouse", "main")].append(item)
    for items in grouped.values():
        items.sort(key=lambda item: (item["location"], item["sku"]))
    totals = {name: sum(item["value"] for item in items) for name, items in grouped.items()}
    if skipped:
        print(f"skipped {skipped} malformed rows in {path}")
    return {"items": dict(grouped), "totals": totals, "skipped": skipped}
'''
PROMPTS = {
    "code edit": (f"Here is a Python function:\n\n```python\n{FUNCTION}```\n\nRewrite it so that the quantity is "
                  "read with float() instead of int(). Reply with the complete function only, unchanged otherwise."),
    "open chat": "Write a short story, about 300 words, about a lighthouse keeper who finds a message in a bottle.",
}


def run(url: str, model: str, prompt: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    first = last = 0.0
    text, usage = "", {}
    with httpx.Client(timeout=600) as client:  # made before the clock: its SSL context is not the server's time
        started = time.perf_counter()
        with client.stream("POST", f"{url}/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        last = time.perf_counter()
                        first = first or last
                        text += choice["delta"]["content"]
    tokens = int(usage.get("completion_tokens", 0))
    return {"tokens": tokens, "ttft": first - started, "seconds": last - started,
            "decode_tok_s": (tokens - 1) / (last - first) if last > first else 0.0, "text": text}


def measure(url: str, label: str, repeat: int, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    model = httpx.get(f"{url}/models", timeout=60).json()["data"][0]["id"]
    rows = {}
    for name, prompt in PROMPTS.items():
        runs = [run(url, model, prompt, max_tokens, extra) for _ in range(repeat)]
        best = bench_reports.median_run(runs, "decode_tok_s")
        rows[name] = {**best, "decode_tok_s_all": [round(r["decode_tok_s"], 1) for r in runs]}
        print(f"{label:45s} {name:10s} {best['tokens']:4d} tokens  {best['decode_tok_s']:6.1f} tok/s "
              f"(runs {rows[name]['decode_tok_s_all']})")
    return {"label": label, "model": model, "rows": rows}


def markdown(results: list[dict[str, Any]]) -> str:
    """One row per server; the last column compares each answer with the first run of the same model (its
    plain decoding, when that came first), prompt by prompt."""
    lines = ["| server | " + " | ".join(f"{name}: tok/s (tokens)" for name in PROMPTS) + " | answers as the first row "
             "of this model |", "|---|" + "---|" * (len(PROMPTS) + 1)]
    first: dict[str, dict[str, Any]] = {}
    for result in results:
        cells = [f"{result['rows'][n]['decode_tok_s']:.1f} ({result['rows'][n]['tokens']})" for n in PROMPTS]
        base = first.setdefault(result["model"], result)
        same = "—" if base is result else ", ".join(
            f"{n}: {'same' if result['rows'][n]['text'] == base['rows'][n]['text'] else 'differs'}" for n in PROMPTS)
        lines.append(f"| {result['label']} | " + " | ".join(cells) + f" | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_reports.add_options(parser)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--extra", default="{}", help="JSON merged into every request body")
    args = parser.parse_args()
    bench_reports.finish(args, lambda: measure(args.url.rstrip("/"), args.label, args.repeat, args.max_tokens,
                                               json.loads(args.extra)), markdown)


if __name__ == "__main__":
    main()

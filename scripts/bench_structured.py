"""What constrained decoding costs: decode tokens/s with and without a JSON schema, at 1 and 8 streams, and the
price of a schema's first use.

    python scripts/bench_structured.py MODEL_DIR [MODEL_DIR...] [--streams 1,8] [--repeat 3] [--json out.json]

Runs the engine the server runs (continuous batching, the grammar mask inside its step), without HTTP.
Constrained rows follow a schema of --items records, sampled at temperature 1; then free rows, sampled the
same way with ignore_eos, generate exactly as many tokens as their constrained twins, so both runs have the
same batch at every step (rows that finish early would otherwise make the batch smaller and the figure
lower). Decode figures exclude the first token; the table shows medians of --repeat rounds. Comparable only
within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.runtime.generation import GenerationEngine, GenerationRequest
from fastllm.runtime.grammar import CompiledGrammar, json_schema_grammar
from fastllm.runtime.models import ServedModel, load_model
from fastllm.runtime.sampling import SamplingParams


def people_schema(items: int, salt: str = "") -> dict:
    record = {"type": "object", "properties": {f"name{salt}": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "city": {"type": "string", "maxLength": 12}},
              "required": [f"name{salt}", "age", "city"], "additionalProperties": False}
    return {"type": "array", "items": record, "minItems": items, "maxItems": items}


async def _stream(engine: GenerationEngine, request: GenerationRequest) -> tuple[float, float, float, int]:
    """(submitted, first token, last token, tokens) on the wall clock."""
    submitted = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async for deltas in engine.generate(request):
        last = time.perf_counter()
        first = first or last
        tokens += sum(len(d.token_ids) for d in deltas)
    return submitted, first, last, tokens


async def _round(engine: GenerationEngine, requests: list[GenerationRequest]) -> dict:
    runs = await asyncio.gather(*(_stream(engine, r) for r in requests))
    start = min(r[1] for r in runs)
    end = max(r[2] for r in runs)
    decoded = sum(r[3] - 1 for r in runs)
    return {"decode_tok_s": decoded / (end - start), "ttft_ms": statistics.median(r[1] - r[0] for r in runs) * 1000,
            "tokens": [r[3] for r in runs]}


def _requests(model: ServedModel, grammar: CompiledGrammar | None, lengths: list[int],
              seed: int) -> list[GenerationRequest]:
    """Constrained rows (``grammar``) end with their grammar, within ``lengths``; free ones run to ``lengths``."""
    prompt = model.chat_template.render([{"role": "user", "content": "List some people as JSON records with their "
                                          "name, age and city."}], add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt, add_special_tokens=False)
    return [GenerationRequest(prompt_ids=ids, params=SamplingParams(temperature=1.0, seed=seed + i),
                              max_tokens=length, ignore_eos=grammar is None, grammar=grammar)
            for i, length in enumerate(lengths)]


def bench(folder: Path, streams: list[int], repeat: int, new_tokens: int, items: int, threads: int) -> dict:
    model = load_model(ModelConfig(model_id=str(folder)), RuntimeConfig(threads=threads), Path("models"))
    assert model.generator is not None and model.grammars is not None
    try:
        started = time.perf_counter()
        model.grammars.tokenizer()
        tokenizer_ms = (time.perf_counter() - started) * 1000
        timings = {}
        for label, salt in (("first_schema", ""), ("new_schema", "_x")):
            started = time.perf_counter()
            model.grammars.compile(json_schema_grammar(people_schema(items, salt), "bench"))
            timings[label] = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        grammar = model.grammars.compile(json_schema_grammar(people_schema(items), "bench"))
        timings["cached_schema"] = (time.perf_counter() - started) * 1000
        result: dict = {"model": model.id, "provider": model.provider, "tokenizer_build_ms": tokenizer_ms,
                        "compile_ms": timings, "levels": {}}
        asyncio.run(_round(model.generator, _requests(model, grammar, [4 * new_tokens], 0)))  # warm-up
        for n in streams:
            rounds: dict[str, list[dict]] = {"free": [], "json_schema": []}
            for r in range(repeat):
                constrained = asyncio.run(_round(model.generator,
                                                 _requests(model, grammar, [4 * new_tokens] * n, 100 * r)))
                free = asyncio.run(_round(model.generator, _requests(model, None, constrained["tokens"], 100 * r)))
                rounds["json_schema"].append(constrained)
                rounds["free"].append(free)
            result["levels"][n] = {label: {key: statistics.median(run[key] for run in runs)
                                           for key in ("decode_tok_s", "ttft_ms")} | {"tokens": runs[-1]["tokens"]}
                                   for label, runs in rounds.items()}
            result["levels"][n]["per_round_ratio"] = [c["decode_tok_s"] / f["decode_tok_s"]
                                                      for f, c in zip(rounds["free"], rounds["json_schema"],
                                                                      strict=True)]
        return result
    finally:
        model.close()


def markdown(results: list[dict]) -> str:
    lines = ["| model | streams | free tok/s | json_schema tok/s | ratio (per round) | TTFT free / schema (ms) |",
             "|---|---|---|---|---|---|"]
    for result in results:
        for n, level in result["levels"].items():
            free, constrained = level["free"], level["json_schema"]
            rounds = ", ".join(f"{r:.2f}" for r in level["per_round_ratio"])
            lines.append(f"| {result['model']} | {n} | {free['decode_tok_s']:.1f} | {constrained['decode_tok_s']:.1f} "
                         f"| {constrained['decode_tok_s'] / free['decode_tok_s']:.2f} ({rounds}) "
                         f"| {free['ttft_ms']:.0f} / {constrained['ttft_ms']:.0f} |")
    lines.append("")
    for result in results:
        c = result["compile_ms"]
        lines.append(f"- {result['model']}: llguidance tokenizer built in {result['tokenizer_build_ms']:.0f} ms (once "
                     f"per model); schema compiled in {c['first_schema']:.1f} ms on first use, a second new schema "
                     f"{c['new_schema']:.1f} ms, the cached one {c['cached_schema']:.3f} ms.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128, help="a bound: constrained rows stop at 4x this")
    parser.add_argument("--items", type=int, default=8, help="records in the schema's fixed-size array")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="also write the table as a page (docs/benchmarks-structured.md)")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    results = [bench(folder, streams, args.repeat, args.new_tokens, args.items, args.threads) for folder in args.models]
    table = markdown(results)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown:
        command = "python scripts/bench_structured.py " + " ".join(sys.argv[1:])
        args.markdown.write_text(
            "# Structured outputs: what constrained decoding costs\n\n"
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d')}. Engine level (no HTTP), written by:\n\n```\n{command}\n```\n\n"
            f"{__doc__.split(chr(10) + chr(10), 2)[2].strip()}\n\n{table}\n")


if __name__ == "__main__":
    main()

"""Engine-level speed of an exported model: prefill, single-stream decode, aggregate at N streams.

    python scripts/bench_engine.py models/SmolLM2-135M-Instruct [--prompt-tokens 131] [--new-tokens 128]

Runs the same GenerationEngine the server runs (continuous batching included), without HTTP. Figures are
medians of --repeat runs after a warm-up, and comparable only within one run on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

from bench_text import TEXT

from fastllm.config import ModelConfig, RuntimeConfig
from fastllm.runtime.decoder import Decoder
from fastllm.runtime.generation import GenerationEngine, GenerationRequest, greedy_tokens
from fastllm.runtime.models import load_model
from fastllm.runtime.sampling import SamplingParams


async def _stream(engine: GenerationEngine, request: GenerationRequest) -> tuple[float, float, int]:
    """(clock at the first token, clock at the last token, tokens)."""
    first = last = 0.0
    tokens = 0
    async for deltas in engine.generate(request):
        now = time.perf_counter()
        if tokens == 0:
            first = now
        last = now
        tokens += sum(len(d.token_ids) for d in deltas)
    return first, last, tokens


def _decoder_loop(decoder: Decoder, prompt: list[int], new_tokens: int) -> float:
    """Tokens/s of a bare greedy loop after its prefill: the engine's decoder and cache code, no engine thread."""
    tokens = greedy_tokens(decoder, prompt)
    next(tokens)  # prefill and the first token
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(tokens)
    rate = (new_tokens - 1) / (time.perf_counter() - start)
    tokens.close()
    return rate


def bench(folder: Path, prompt_tokens: int, new_tokens: int, streams: list[int], repeat: int,
          threads: int, providers: str | list[str] = "auto") -> dict[str, object]:
    runtime = RuntimeConfig(threads=threads, max_batch_size=max(streams), providers=providers)
    model = load_model(ModelConfig(model_id=str(folder)), runtime, Path("models"))
    engine = model.generator
    if engine is None:
        raise SystemExit(f"{folder} is not a text-generation model")
    prompt = model.tokenizer.encode(TEXT, add_special_tokens=False)[:prompt_tokens]
    greedy = SamplingParams(temperature=0.0)

    def request(offset: int = 0) -> GenerationRequest:
        # Distinct prompts per stream, so no two rows are identical work.
        ids = prompt[offset:] + prompt[:offset]
        return GenerationRequest(ids, greedy, max_tokens=new_tokens, ignore_eos=True)

    decoder = engine.decoder
    prefill = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        decoder.prefill([prompt])
        if i:
            prefill.append((time.perf_counter() - start) * 1000)

    # The decoder alone, greedy, in this thread: what the graph and ONNX Runtime give, without the engine's
    # thread, queues and per-token hand-off to asyncio (the figure to set beside a C++ loop's).
    loop = [_decoder_loop(decoder, prompt, new_tokens) for _ in range(repeat)]

    asyncio.run(_stream(engine, request()))  # warm-up
    single = []
    for _ in range(repeat):
        first, last, tokens = asyncio.run(_stream(engine, request()))
        single.append((tokens - 1) / (last - first))

    # Two views of N streams: everything from submission on (their prefills included), and decoding alone
    # (tokens after each stream's first one, from the moment all have started) to set beside the 1-stream
    # decode figure, which excludes prefill too.
    aggregate: dict[int, float] = {}
    decoding: dict[int, float] = {}
    for n in streams:
        runs, decode_runs = [], []
        for _ in range(repeat):
            async def together(n: int = n) -> tuple[float, list[tuple[float, float, int]]]:
                start = time.perf_counter()
                return start, await asyncio.gather(*(_stream(engine, request(7 * i)) for i in range(n)))

            start, results = asyncio.run(together())
            end = max(r[1] for r in results)
            runs.append(sum(r[2] for r in results) / (end - start))
            decode_runs.append(sum(r[2] - 1 for r in results) / (end - max(r[0] for r in results)))
        aggregate[n] = statistics.median(runs)
        decoding[n] = statistics.median(decode_runs)
    weights = sum(p.stat().st_size for p in folder.iterdir() if ".onnx" in p.name)
    model.close()
    return {
        "model": model.id, "folder": str(folder), "quantization": model.manifest.quantization,
        "dtype": model.manifest.dtype, "provider": decoder.provider, "weights_mb": round(weights / 1e6),
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens, "prefill_ms": round(statistics.median(prefill), 1),
        "decode_tok_s_1": round(statistics.median(single), 1),
        "decoder_loop_tok_s_1": round(statistics.median(loop), 1),
        "aggregate_tok_s": {str(n): round(v, 1) for n, v in aggregate.items()},
        "decode_tok_s": {str(n): round(v, 1) for n, v in decoding.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": threads or "physical cores",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=131)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", default="4,8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--providers", default="auto",
                        help='"auto" (CUDA, then CoreML, then CPU) or a comma-separated list of providers')
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    providers = "auto" if args.providers == "auto" else args.providers.split(",")
    results = [bench(m, args.prompt_tokens, args.new_tokens, streams, args.repeat, args.threads, providers)
               for m in args.models]
    print("| model | provider | weights MB | prefill ms | decode tok/s, 1 stream (decoder loop alone) | " +
          " | ".join(f"{n} streams tok/s (decoding)" for n in streams) + " |")
    print("|---|---|---|---|---|" + "---|" * len(streams))
    for r in results:
        agg, dec = r["aggregate_tok_s"], r["decode_tok_s"]
        print(f"| {r['model']} | {r['provider']} | {r['weights_mb']} | {r['prefill_ms']} | "
              f"{r['decode_tok_s_1']} ({r['decoder_loop_tok_s_1']}) | " +
              " | ".join(f"{agg[str(n)]} ({dec[str(n)]})" for n in streams) + " |")  # type: ignore[index]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""The ONNX Runtime GenAI engine on a GenAI-builder model folder: the reference row for bench_engine.py.

    pip install onnxruntime-genai==0.12.2    # its runtime; never a FastLLM dependency at serve time
    python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p int4 -e cpu \
        --extra_options int4_accuracy_level=4 int4_block_size=32
    python scripts/bench_genai.py OUT [--prompt-tokens 131] [--new-tokens 128]

Single stream only: GenAI's Python API generates one sequence per Generator. Same prompt text and
greedy decoding as bench_engine.py, so the two are comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_engine import TEXT


def main() -> None:
    import onnxruntime_genai as og

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=131)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = og.Model(str(args.folder))
    tokenizer = og.Tokenizer(model)
    prompt = list(tokenizer.encode(TEXT))[: args.prompt_tokens]
    prefill, decode = [], []
    for i in range(args.repeat + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + args.new_tokens, do_sample=False, min_length=0)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        generator.generate_next_token()
        first = time.perf_counter()
        tokens = 1
        while not generator.is_done() and tokens < args.new_tokens:
            generator.generate_next_token()
            tokens += 1
        end = time.perf_counter()
        if i:  # the first round is the warm-up
            prefill.append((first - start) * 1000)
            decode.append((tokens - 1) / (end - first))
    size = sum(p.stat().st_size for p in args.folder.iterdir() if ".onnx" in p.name)
    print(f"| ONNX Runtime GenAI {og.__version__} | {size / 1e6:.0f} | {statistics.median(prefill):.1f} | "
          f"{statistics.median(decode):.1f} | - | - |")


if __name__ == "__main__":
    main()

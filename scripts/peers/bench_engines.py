"""Engine-level figures of the peers, in the same shape as scripts/bench_engine.py's rows.

Each engine runs in its peer's own venv (never FastLLM's), fed the same prompt text, the same prompt and
output lengths, greedy, single stream, medians of --repeat runs after a warm-up:

    .cache/peers/hf/bin/python scripts/peers/bench_engines.py transformers HF_FOLDER
    .cache/peers/hf/bin/python scripts/peers/bench_engines.py optimum HF_FOLDER
    .cache/peers/hf/bin/python scripts/peers/bench_engines.py genai GENAI_FOLDER
    .cache/peers/llamacpp/bin/python scripts/peers/bench_engines.py llamacpp FILE.gguf
    .cache/peers/hf/bin/python scripts/peers/bench_engines.py sentence-transformers ST_FOLDER

Prefill is the time to the first token; decode tok/s counts the tokens after it over the time after it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_text import TEXT

Stream = Callable[[list[int], int], Iterator[int]]  # (prompt ids, new tokens) -> yields once per token


def _time_stream(stream: Stream, prompt: list[int], new_tokens: int, repeat: int) -> tuple[float, float]:
    prefill, decode = [], []
    for i in range(repeat + 1):
        start = time.perf_counter()
        first = start
        count = 0
        for _ in stream(prompt, new_tokens):
            count += 1
            if count == 1:
                first = time.perf_counter()
        end = time.perf_counter()
        if count != new_tokens:
            raise SystemExit(f"the engine produced {count} tokens, not {new_tokens}")
        if i:  # the first round warms up
            prefill.append((first - start) * 1000)
            decode.append((count - 1) / (end - first))
    return statistics.median(prefill), statistics.median(decode)


def _hf_stream(model: object) -> Stream:
    """transformers' generate (for torch and for optimum's ORTModel), one token at a time via a streamer."""
    import threading

    import torch
    from transformers.generation.streamers import BaseStreamer

    class Tick(BaseStreamer):
        def __init__(self) -> None:
            self.events: list[float] = []
            self.ready = threading.Semaphore(0)
            self.seen = 0

        def put(self, value: object) -> None:
            self.seen += 1
            if self.seen > 1:  # the first put is the prompt
                self.ready.release()

        def end(self) -> None:
            self.ready.release()

    def stream(prompt: list[int], new_tokens: int) -> Iterator[int]:
        tick = Tick()
        ids = torch.tensor([prompt])
        kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens,
                  "min_new_tokens": new_tokens, "do_sample": False, "streamer": tick}
        worker = threading.Thread(target=lambda: model.generate(**kwargs))  # type: ignore[attr-defined]
        worker.start()
        for _ in range(new_tokens):
            tick.ready.acquire()
            yield 0
        worker.join()

    return stream


def bench_transformers(folder: Path, threads: int) -> tuple[str, Stream, Callable[[str], list[int]]]:
    import torch
    import transformers

    torch.set_num_threads(threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    return f"transformers {transformers.__version__} generate, torch {torch.__version__} fp32", _hf_stream(model), \
        lambda text: tokenizer(text)["input_ids"]


def bench_optimum(folder: Path, threads: int) -> tuple[str, Stream, Callable[[str], list[int]]]:
    import onnxruntime
    import optimum.version
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    export_dir = Path(".cache/peers/optimum-export")
    if not (export_dir / "model.onnx").exists():
        ORTModelForCausalLM.from_pretrained(folder, export=True).save_pretrained(export_dir)
    model = ORTModelForCausalLM.from_pretrained(export_dir, session_options=options)
    return f"optimum {optimum.version.__version__} ORTModelForCausalLM fp32, onnxruntime {onnxruntime.__version__}", \
        _hf_stream(model), lambda text: tokenizer(text)["input_ids"]


def bench_genai(folder: Path, threads: int) -> tuple[str, Stream, Callable[[str], list[int]]]:
    import onnxruntime_genai as og

    config = folder / "genai_config.json"
    settings = json.loads(config.read_text())
    settings["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config.write_text(json.dumps(settings, indent=2))
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)

    def stream(prompt: list[int], new_tokens: int) -> Iterator[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False, min_length=0)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        for _ in range(new_tokens):
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    return f"ONNX Runtime GenAI {og.__version__} engine, its builder's int4", stream, \
        lambda text: list(tokenizer.encode(text))


def bench_llamacpp(path: Path, threads: int) -> tuple[str, Stream, Callable[[str], list[int]]]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    eos = llm.token_eos()

    def stream(prompt: list[int], new_tokens: int) -> Iterator[int]:
        llm.reset()  # no prompt-cache reuse between rounds: every round pays its prefill
        chunks = llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, stream=True,
                                       logit_bias={eos: -1e9})
        for chunk in chunks:
            if chunk["choices"][0]["finish_reason"] is None:  # the closing chunk carries no token
                yield 0

    return f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), the Q4_1 GGUF", stream, \
        lambda text: llm.tokenize(text.encode(), add_bos=False)


def bench_sentence_transformers(folder: Path, threads: int, batches: list[int], repeat: int) -> dict[str, object]:
    import sentence_transformers
    import torch

    torch.set_num_threads(threads)
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    sentences = [f"{TEXT.split('. ')[0]} {i}" for i in range(max(batches))]
    rates = {}
    for batch in batches:
        model.encode(sentences[:batch], batch_size=batch)
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            model.encode(sentences[:batch], batch_size=batch)
            runs.append(batch / (time.perf_counter() - start))
        rates[str(batch)] = round(statistics.median(runs), 1)
    return {"engine": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__} CPU",
            "inputs_per_s": rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=["transformers", "optimum", "genai", "llamacpp", "sentence-transformers"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=131)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", default="1,8,32", help="sentence-transformers batch sizes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.engine == "sentence-transformers":
        row = bench_sentence_transformers(args.path, args.threads, [int(b) for b in args.batches.split(",")],
                                          args.repeat)
    else:
        builders = {"transformers": bench_transformers, "optimum": bench_optimum, "genai": bench_genai,
                    "llamacpp": bench_llamacpp}
        name, stream, encode = builders[args.engine](args.path, args.threads)
        prompt = encode(TEXT)[: args.prompt_tokens]
        prefill_ms, decode = _time_stream(stream, prompt, args.new_tokens, args.repeat)
        row = {"engine": name, "prefill_ms": round(prefill_ms, 1), "decode_tok_s_1": round(decode, 1),
               "prompt_tokens": len(prompt), "new_tokens": args.new_tokens}
    print(json.dumps(row))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()

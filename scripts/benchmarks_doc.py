"""Write docs/benchmarks.md (+ .png, .json) from the results scripts/benchmarks.sh left in a folder, and the
pages its parts wrote: against llama-server (whose runs join this page's server table and plot), long prompts,
embeddings against Infinity.

    python scripts/benchmarks_doc.py .cache/bench docs
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastllm.bench.report import Report, markdown, plot, read_report, write_json

PACKAGES = ["onnxruntime", "onnxruntime-genai", "llama_cpp_python", "optimum", "optimum-onnx", "transformers",
            "torch", "sentence-transformers", "tokenizers", "uvicorn", "litestar"]


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if a and b else "–"


def _median(rounds: list[Any]) -> Any:
    """Each figure's median over the rounds of one engine; rows (one per model) and nested figures alike."""
    first = rounds[0]
    if isinstance(first, list):
        return [_median([r[i] for r in rounds]) for i in range(len(first))]
    if isinstance(first, dict):
        return {key: _median([r[key] for r in rounds if key in r]) for key in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return round(statistics.median(rounds), 1)
    return first


def _paired(rounds: dict[str, list[Any]], peer: str) -> str:
    """Our int4 single-stream decode over the peer's, round by round: the rounds ran back to back, so
    each ratio is free of the drift between rounds."""
    ratios = []
    for ours, theirs in zip(rounds.get("fastllm", []), rounds.get(peer, []), strict=False):
        int4 = next((r for r in ours if r["quantization"] == "int4"), None)
        if int4 and theirs.get("decode_tok_s_1"):
            ratios.append(f"{int4['decode_tok_s_1'] / theirs['decode_tok_s_1']:.2f}×")
    return ", ".join(ratios) or "–"


def _versions(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        for package in json.loads(line):
            name = package["name"].lower().replace("_", "-")
            found.setdefault(name, package["version"])
    return {p: found[p.lower().replace("_", "-")] for p in PACKAGES if p.lower().replace("_", "-") in found}


# The models of the llama-server page, as its labels name them ("FastLLM <model> int4", "llama-server <model> Q4_0").
MODELS = ("SmolLM2-135M", "Qwen2.5-Coder-0.5B")


def _page(path: Path) -> list[str]:
    """A page another benchmark script wrote, its title dropped, to stand as a section here ("" if not run)."""
    if not path.is_file():
        return [f"Not measured in this run: `{path.name}` is missing.", ""]
    lines = path.read_text().splitlines()
    body = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()
    return [*body.splitlines(), ""]


def _interleaved(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(model, clients) -> the round-by-round page's median ratio and TTFTs (scripts/bench_interleaved.sh), the
    steadier measure of the server targets on a machine whose speed drifts between sweeps; {} if not run."""
    rows = json.loads(path.read_text()) if path.is_file() else []
    return {(row["model"], row["clients"]): row for row in rows}


def main() -> None:
    results, docs = Path(sys.argv[1]), Path(sys.argv[2])
    if not list(results.glob("engine-fastllm.*.json")):
        # Checked before anything is written: the page, its plot and its JSON would otherwise be overwritten
        # with an empty run.
        sys.exit(f"{results} holds no engine-fastllm.*.json: run scripts/benchmarks.sh first (RESUME=1 keeps results)")
    reports = [read_report(path) for path in sorted(results.glob("server-*.json"))]
    runs = [run for found in reports for run in found.runs]
    # The page can be composed again after one part ran anew (SKIP=...): each part's run is dated.
    dated = [f"this folder's server runs {min(r.created for r in reports)[:16]}"] if reports else []
    peer_page = docs / "benchmarks-llama-server.json"
    if peer_page.is_file():
        peer = read_report(peer_page)
        runs += peer.runs
        dated.append(f"llama-server page {peer.created[:16]}")
    report = Report.new(runs)
    write_json(report, docs / "benchmarks.json")
    plot(report, docs / "benchmarks.png")
    by_label = {run.label: {lv.concurrency: lv for lv in run.levels} for run in runs}
    rounds: dict[str, list[Any]] = {}
    for path in sorted(results.glob("engine-*.json")):  # engine-NAME.ROUND.json
        rounds.setdefault(path.name.removeprefix("engine-").split(".")[0], []).append(json.loads(path.read_text()))
    engines = {name: _median(runs) for name, runs in rounds.items()}
    ours = engines.pop("fastllm")
    peers = engines
    st = peers.pop("sentence-transformers", None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

    def tok(label: str, clients: int) -> float | None:
        level = by_label.get(label, {}).get(clients)
        return level.tok_s if level else None

    def ttft(label: str, clients: int) -> float | None:
        level = by_label.get(label, {}).get(clients)
        return level.ttft_p50_ms if level else None

    int4, serial = "FastLLM SmolLM2-135M int4", "llama-cpp-python server (Q4_1, serial)"
    ours_int4 = next((r for r in ours if r["quantization"] == "int4"), None)
    genai = peers.get("genai", {})
    embed = by_label.get("FastLLM MiniLM", {})
    st_32 = (st or {}).get("inputs_per_s", {}).get("32")
    alternating = _interleaved(docs / "benchmarks-interleaved.json")

    def rounds_cell(model: str, clients: int) -> str:
        row = alternating.get((model, clients))
        if row is None:
            return "not run"
        ours, theirs = row["ttft_p50_ms"]
        return f"**{row['ratio']:.2f}×** (TTFT p50 {ours} vs {theirs} ms)"

    headline = [
        "| comparison | measured | target |",
        "|---|---|---|",
        *[f"| server, {model}, {n} client{'s' if n > 1 else ''}: FastLLM int4 vs llama-server Q4_0 | "
          f"median of the alternating rounds {rounds_cell(model, n)}; the sweep below "
          f"{_ratio(tok(f'FastLLM {model} int4', n), tok(f'llama-server {model} Q4_0', n))} "
          f"({tok(f'FastLLM {model} int4', n)} vs {tok(f'llama-server {model} Q4_0', n)} tok/s; TTFT p50 "
          f"{ttft(f'FastLLM {model} int4', n)} vs {ttft(f'llama-server {model} Q4_0', n)} ms) | "
          f"{'≥ 1.3×' if n == 1 else '≥ 1.5×'}, TTFT no worse |" for model in MODELS for n in (1, 8)],
        f"| server, SmolLM2, 8 clients: FastLLM int4 vs llama-cpp-python's server (serial) | "
        f"{_ratio(tok(int4, 8), tok(serial, 8))} ({tok(int4, 8)} vs {tok(serial, 8)} tok/s) | – |",
        f"| engine, decode 1 stream: FastLLM fused int4 vs ONNX Runtime GenAI int4 | "
        f"{_ratio(ours_int4 and ours_int4['decode_tok_s_1'], genai.get('decode_tok_s_1'))} "
        f"({ours_int4 and ours_int4['decode_tok_s_1']} vs {genai.get('decode_tok_s_1')} tok/s); "
        f"per round {_paired(rounds, 'genai')} | ≥ 1× |",
        f"| engine, decode 1 stream: FastLLM decoder loop alone (no engine thread) vs GenAI | "
        f"{_ratio(ours_int4 and ours_int4.get('decoder_loop_tok_s_1'), genai.get('decode_tok_s_1'))} "
        f"({ours_int4 and ours_int4.get('decoder_loop_tok_s_1')} vs {genai.get('decode_tok_s_1')} tok/s) | – |",
        f"| engine, prefill: ONNX Runtime GenAI vs FastLLM fused int4 (time ratio) | "
        f"{_ratio(genai.get('prefill_ms'), ours_int4 and ours_int4['prefill_ms'])} "
        f"({genai.get('prefill_ms')} vs {ours_int4 and ours_int4['prefill_ms']} ms) | ≥ 1× |",
        f"| engine, 8 streams vs 1 stream, FastLLM fused int4, decoding only | "
        f"{_ratio(ours_int4 and ours_int4.get('decode_tok_s', {}).get('8'), ours_int4 and ours_int4['decode_tok_s_1'])}"
        f" | ≥ 2.5× |",
        f"| engine, 8 streams (prefills included) vs 1 stream, FastLLM fused int4 | "
        f"{_ratio(ours_int4 and ours_int4['aggregate_tok_s'].get('8'), ours_int4 and ours_int4['decode_tok_s_1'])}"
        f" | – |",
        f"| embeddings, batch 32: FastLLM server vs sentence-transformers | "
        f"{_ratio(embed[32].tok_s if 32 in embed else None, st_32)} "
        f"({embed[32].tok_s if 32 in embed else None} vs {st_32} inputs/s) | ≥ 1.5× |",
    ]
    engine = ["| engine | prefill ms | decode tok/s, 1 stream (our decoder loop alone) "
              "| 4 streams tok/s, prefills included (decoding only) | 8 streams |", "|---|---|---|---|---|"]
    for row in ours:
        agg, dec = row["aggregate_tok_s"], row.get("decode_tok_s", {})
        streams = [f"{agg.get(n, '–')} ({dec.get(n, '–')})" for n in ("4", "8")]
        engine.append(f"| FastLLM engine, fused {row['quantization'] if row['quantization'] != 'none' else 'fp32'} "
                      f"({row['weights_mb']} MB) | {row['prefill_ms']} | {row['decode_tok_s_1']} "
                      f"({row.get('decoder_loop_tok_s_1', '–')}) "
                      f"| {streams[0]} | {streams[1]} |")
    for key in ("genai", "llamacpp", "optimum", "transformers"):
        if key in peers:
            row = peers[key]
            engine.append(f"| {row['engine']} | {row['prefill_ms']} | {row['decode_tok_s_1']} | – | – |")
    embeddings = ["| engine | batch 1 inputs/s | batch 8 | batch 32 |", "|---|---|---|---|"]
    if embed:
        embeddings.append("| FastLLM server (HTTP included), MiniLM export | " +
                          " | ".join(str(embed[b].tok_s) if b in embed else "–" for b in (1, 8, 32)) + " |")
    if st:
        embeddings.append(f"| {st['engine']} (no HTTP) | " +
                          " | ".join(str(st['inputs_per_s'].get(str(b), '–')) for b in (1, 8, 32)) + " |")
    profile = ["| export | batch | step ms | in operators | our Python | weights read | MatMulNBits "
               "| GroupQueryAttention | the rest |", "|---|---|---|---|---|---|---|---|---|"]
    profiled = results / "profile.json"
    for row in json.loads(profiled.read_text()) if profiled.is_file() else []:
        share = row["share"]
        rest = 1 - share.get("MatMulNBits", 0) - share.get("GroupQueryAttention", 0)
        profile.append(f"| {row['model']} | {row['batch']} | {row['step_ms']} | {row['operators_ms']} | "
                       f"{row['python_ms']} | {row['weights_gb_s']} GB/s | {share.get('MatMulNBits', 0):.0%} | "
                       f"{share.get('GroupQueryAttention', 0):.0%} | {rest:.0%} |")
    versions = _versions(results / "versions.jsonl")
    text = [
        "# Benchmarks",
        "",
        "Written by `scripts/benchmarks.sh` (one command: exports, peer venvs, every server one at a time, then "
        "this page). **Figures are comparable only within one run on one machine**: rerun it on yours.",
        "",
        f"- Machine: {report.machine.cpu}, **{report.machine.cores} cores**, {report.machine.system}, "
        f"Python {report.machine.python}; composed {report.created[:16]} at FastLLM commit {commit} from runs "
        f"at: {', '.join(dated)} (engine level, profile and structured outputs with this folder's server runs).",
        f"- Model: SmolLM2-135M-Instruct from the same Q4_1 GGUF for everyone; {ours[0]['prompt_tokens']}-token "
        f"prompt and {ours[0]['new_tokens']} new tokens at engine level, greedy.",
        "- Server level: `fastllm bench`, streamed chat completions, `max_tokens` fixed with `ignore_eos` and end "
        "tokens banned by `logit_bias`, one request per client per round (at least 4), medians of rounds after a "
        "warm-up request.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "- llama.cpp is measured as people serve it: its own `llama-server` with parallel slots (continuous "
        "batching), built from source, on the GGUF requantized to Q4_0 (its fastest CPU format) and on the "
        "original file (`scripts/bench_llama_server.sh`, whose page's runs are in the table and plot below). "
        "llama-cpp-python's server, which serves one request at a time, is kept as a row marked serial.",
        "- Like with like: FastLLM's int4 and llama.cpp's Q4_0 of the same GGUF score alike (perplexity over 2,048 "
        "tokens of this repo's Python, 2026-12-01: SmolLM2 23.9 vs 23.3, Qwen2.5-Coder-0.5B 13.0 vs 13.0; fp32 "
        "18.4 and 12.1). Runs dated before 2026-12-01T23:00 served the earlier symmetric int4 (29.2 and 13.7), "
        "which decodes at the same speed.",
        "- The sections after the engine level are pages of their own, written by their scripts in the same "
        "`scripts/benchmarks.sh` run unless it was told to skip them: long prompts "
        "([benchmarks-long-prompts.md](benchmarks-long-prompts.md)), embeddings against Infinity "
        "([benchmarks-embeddings.md](benchmarks-embeddings.md)) and FastLLM and llama-server alternating round by "
        "round ([benchmarks-interleaved.md](benchmarks-interleaved.md)), whose medians the headline gives first: "
        "this machine's speed drifts by 20-30% over minutes, so one sweep of each server can land in different "
        "phases. Also: [speculative decoding](benchmarks-speculative.md), [what constrained decoding costs]"
        "(benchmarks-structured.md), [CUDA](benchmarks-cuda.md).",
        "",
        "## Headlines",
        "",
        *headline,
        "",
        "## Server level: chat",
        "",
        "![throughput and latency against concurrency](benchmarks.png)",
        "",
        markdown(Report(machine=report.machine, created=report.created,
                        runs=[r for r in runs if r.mode == "chat"])).split("\n", 2)[2],
        "## Engine level (no HTTP), single stream unless stated",
        "",
        f"Medians over {len(rounds.get('fastllm', []))} interleaved rounds (ours, GenAI, llama.cpp, then again); "
        "the others ran once. Decoding only: tokens after each stream's first, from when all streams had started.",
        "",
        *engine,
        "",
        "## Where a decode step's time goes",
        "",
        "`scripts/profile_step.py`: ONNX Runtime's profiler over the engine's own decode step through the int4 "
        "graph (shared KV buffers bound in place), after 256 tokens per row; medians. \"Weights read\" is the int4 "
        "file over the step's time, to set against the machine's memory bandwidth (25–39 GB/s measured with 1–2 "
        "threads on a 2-core AMD EPYC VM): one stream is bound by the "
        "int4 kernel's reading and unpacking of the weights; at 8 rows that kernel computes in int8 and its time "
        "grows with the rows (compute-bound), which is why the server sends steps of `int8_decode_rows` rows or more "
        "through the int8 prompt graph instead; GroupQueryAttention runs a small GEMM pair per row and query head. "
        "Our Python is well under a millisecond a step; the profiler itself adds 1–2 ms (the server's own gap "
        "between tokens is the ITL column above).",
        "",
        *profile,
        "",
        "## Embeddings (all-MiniLM-L6-v2)",
        "",
        *embeddings,
        "",
        "### Under load, against Infinity",
        "",
        *_page(docs / "benchmarks-embeddings.md"),
        "## Round by round against llama-server",
        "",
        *_page(docs / "benchmarks-interleaved.md"),
        "## Long prompts and conversations, against llama-server",
        "",
        *_page(docs / "benchmarks-long-prompts.md"),
    ]
    (docs / "benchmarks.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()

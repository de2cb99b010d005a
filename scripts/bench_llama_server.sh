#!/usr/bin/env bash
# Throughput against the honest llama.cpp peer: its native llama-server (parallel slots = continuous batching),
# same machine, same load, one server at a time, written to docs/benchmarks-llama-server.md (+ .png, .json):
#   scripts/bench_llama_server.sh                      # SmolLM2-135M and Qwen2.5-Coder-0.5B, ~20 min on 2 cores
#   MODELS=smollm2 scripts/bench_llama_server.sh       # one of them
# Load: `fastllm bench`, streamed chat, 1/2/4/8/16 clients, 128 tokens per answer (end tokens banned by
# logit_bias, greedy). FastLLM serves the fused int4 export (speculation off: plain decoding, as the peer).
# llama-server runs 16 slots (as many as the most clients), 2 threads, on the GGUF requantized to Q4_0 (its
# fastest CPU format, repacked on AVX2) and on the original file. Nothing else should run meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh all
# shellcheck disable=SC1091
source scripts/wait_ready.sh
models="$bench_models"
threads="${THREADS:-$(nproc)}"
levels="${LEVELS:-1,2,4,8,16}"
out=.cache/bench-llama-server
mkdir -p "$out"
llama_bin="$(scripts/peers/llama_server.sh build)"

bench() {  # LABEL PORT BAN -- SERVER COMMAND...
  local label="$1" port="$2" ban="$3"; shift 4
  local json="$out/${label//[^A-Za-z0-9.]/_}.json"
  start_server "$port" "$json.log" "$@"
  echo "== $label" >&2
  fastllm bench "http://127.0.0.1:$port/v1" --label "$label" --concurrency "$levels" --requests 1 --max-tokens 128 \
    --ban-tokens "$ban" --json "$json" >&2
  stop_server
  merged+=(--merge "$json")
}

merged=()
for name in ${MODELS:-smollm2 qwen-coder}; do
  bench_pair "$name"  # $gguf, $title, $ban, $original, $q4_0
  bench "FastLLM $title int4" 8401 "$ban" -- fastllm serve --model "$models/$name-fused-int4" --port 8401 \
    --threads "$threads" --max-batch-size 16 --log-level warning
  bench "llama-server $title Q4_0" 8402 "$ban" -- scripts/peers/llama_server.sh 8402 "$threads" 16 "$q4_0"
  bench "llama-server $title $original" 8402 "$ban" -- scripts/peers/llama_server.sh 8402 "$threads" 16 "$gguf"
done
fastllm bench "${merged[@]}" --markdown "$out/table.md" --plot docs/benchmarks-llama-server.png \
  --json docs/benchmarks-llama-server.json >&2
python - "$out/table.md" docs/benchmarks-llama-server.json <<'PY' > docs/benchmarks-llama-server.md
import json, subprocess, sys
table, runs = open(sys.argv[1]).read(), json.load(open(sys.argv[2]))["runs"]
tok = {(r["label"], lv["concurrency"]): lv["tok_s"] for r in runs for lv in r["levels"]}
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
print("# Against llama.cpp's own server\n")
print(f"{model}; `scripts/bench_llama_server.sh` (`fastllm bench`: streamed chat, 128 tokens per answer, "
      "greedy, one request per client per round after a warm-up). llama-server: 16 parallel slots, same threads.\n")
print("| model | clients | FastLLM int4 tok/s | llama-server Q4_0 tok/s | ratio | llama-server, original file | ratio |")
print("|---|---|---|---|---|---|---|")
for r in runs:
    if not r["label"].startswith("FastLLM "):
        continue
    title = r["label"].removeprefix("FastLLM ").removesuffix(" int4")
    peers = sorted({l for l, _ in tok if l.startswith(f"llama-server {title} ")}, key=lambda l: "Q4_0" not in l)
    for lv in r["levels"]:
        n, ours = lv["concurrency"], lv["tok_s"]
        cells = []
        for peer in peers:
            theirs = tok.get((peer, n))
            cells += [f"{theirs:g} ({peer.rsplit(' ', 1)[1]})" if theirs else "–",
                      f"{ours / theirs:.2f}×" if theirs else "–"]
        print(f"| {title} | {n} | {ours:g} | " + " | ".join(cells) + " |")
print("\n![throughput and latency against concurrency](benchmarks-llama-server.png)\n")
print(table.split("\n", 2)[2] if table.startswith("#") else table)
PY
echo "wrote docs/benchmarks-llama-server.md" >&2

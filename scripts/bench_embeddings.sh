#!/usr/bin/env bash
# /v1/embeddings under load, FastLLM against Infinity 0.0.78 on the same all-MiniLM-L6-v2 ONNX graph (our
# export), one server at a time, same inputs (scripts/bench_embeddings.py: 1 client x 1 input, 1 x 32, 8 x 32;
# median of 3 rounds each), with each server's peak resident memory; written to docs/benchmarks-embeddings.md.
#   scripts/bench_embeddings.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh all
# shellcheck disable=SC1091
source scripts/wait_ready.sh
threads="${THREADS:-$(nproc)}"
model="$bench_models/minilm"
out=.cache/bench-embeddings
mkdir -p "$out"
[ -f "$model/fastllm.json" ] || fastllm export "$(scripts/fetch_minilm.sh)" --name all-MiniLM-L6-v2 -o "$model" \
  --force >&2
scripts/peers/infinity.sh install
peak() { grep VmHWM "/proc/$server_pid/status" | awk '{printf "%d\n", $2 * 1024}'; }

start_server 8401 "$out/fastllm.log" fastllm serve --model "$model" --port 8401 --threads "$threads" \
  --log-level warning
python scripts/bench_embeddings.py http://127.0.0.1:8401/v1 --model all-MiniLM-L6-v2 --json "$out/fastllm.json" \
  | sed 's/^/FastLLM   /' >&2
fastllm_rss="$(peak)"
stop_server
start_server 8402 "$out/infinity.log" scripts/peers/infinity.sh 8402 "$PWD/$model" \
  --served-model-name all-MiniLM-L6-v2 --url-prefix /v1
python scripts/bench_embeddings.py http://127.0.0.1:8402/v1 --model all-MiniLM-L6-v2 --json "$out/infinity.json" \
  | sed 's/^/Infinity  /' >&2
infinity_rss="$(peak)"
stop_server
python - "$out" "$fastllm_rss" "$infinity_rss" <<'PY' > docs/benchmarks-embeddings.md
import datetime, json, os, subprocess, sys
out, rss = sys.argv[1], {"FastLLM": float(sys.argv[2]), "Infinity 0.0.78": float(sys.argv[3])}
ours, theirs = (json.load(open(f"{out}/{n}.json"))["inputs_per_s"] for n in ("fastllm", "infinity"))
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
print("# Embeddings under load, against Infinity\n")
print(f"{model}, {os.cpu_count()} cores, {datetime.date.today()}; `scripts/bench_embeddings.sh`. Infinity 0.0.78 "
      "(`infinity_emb v2 --engine optimum --pooling-method mean`) serves our all-MiniLM-L6-v2 export's ONNX graph, "
      "which it optimizes itself; inputs of 4 to 120 words, the same for both, one server at a time, median of 3 "
      "rounds.\n")
print("| server | 1 client × 1 input | 1 client × 32 | 8 clients × 32 | peak RSS |")
print("|---|---|---|---|---|")
levels = ("1x1", "1x32", "8x32")
print("| FastLLM | " + " | ".join(f"{ours[k]:.0f} inputs/s ({ours[k] / theirs[k]:.2f}×)" for k in levels)
      + f" | {rss['FastLLM'] / 2**20:,.0f} MiB |")
print("| Infinity 0.0.78 | " + " | ".join(f"{theirs[k]:.0f}" for k in levels)
      + f" | {rss['Infinity 0.0.78'] / 2**20:,.0f} MiB |")
PY
echo "wrote docs/benchmarks-embeddings.md" >&2

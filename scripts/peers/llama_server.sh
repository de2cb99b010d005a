#!/usr/bin/env bash
# llama.cpp's own server, `llama-server` (parallel slots = continuous batching, prompt cache), built once from
# the llama.cpp tree that llama-cpp-python's sdist carries (no network beyond PyPI; ~15 min on 2 cores), and
# `llama-quantize` beside it. Built binaries are cached in .cache/peers/llama.cpp/bin-<flags>.
#   scripts/peers/llama_server.sh build                           # build only, print the bin folder
#   scripts/peers/llama_server.sh PORT THREADS SLOTS GGUF [ARGS]  # serve GGUF on 127.0.0.1:PORT
set -euo pipefail
cd "$(dirname "$0")/../.."
root=.cache/peers/llama.cpp
# shellcheck disable=SC1091
source scripts/peers/ggml_flags.sh  # ggml_cflags: for this CPU, without ggml's AMX matmul (see there)
bin="$root/bin-$(echo "$ggml_cflags" | sha256sum | cut -c1-8)"
if [ ! -x "$bin/llama-server" ] || [ ! -x "$bin/llama-quantize" ]; then
  mkdir -p "$root"
  sdist=$(ls "$root"/llama_cpp_python-0.3.36.tar.gz 2>/dev/null || true)
  if [ -z "$sdist" ]; then
    python3 -m pip download -q --no-binary :all: --no-deps -d "$root" "llama-cpp-python==0.3.36" >&2
    sdist="$root/llama_cpp_python-0.3.36.tar.gz"
  fi
  rm -rf "$root/src" && mkdir -p "$root/src"
  tar -xzf "$sdist" -C "$root/src" --strip-components=1
  cmake -S "$root/src/vendor/llama.cpp" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_C_FLAGS="$ggml_cflags" -DCMAKE_CXX_FLAGS="$ggml_cflags" >&2
  cmake --build "$root/build" --target llama-server llama-quantize -j "$(nproc)" >&2
  mkdir -p "$bin" && cp "$root/build/bin/llama-server" "$root/build/bin/llama-quantize" "$bin/"
fi
if [ "${1:-}" = build ]; then echo "$PWD/$bin"; exit 0; fi
port="$1" threads="$2" slots="$3" gguf="$4"; shift 4
# Context: SLOTS slots of 8192 tokens each (llama-server splits --ctx-size across its slots).
exec "$bin/llama-server" --model "$gguf" --host 127.0.0.1 --port "$port" --threads "$threads" \
  --threads-batch "$threads" --parallel "$slots" --ctx-size $((8192 * slots)) --cont-batching "$@"

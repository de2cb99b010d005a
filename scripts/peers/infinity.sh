#!/usr/bin/env bash
# Infinity 0.0.78 (infinity_emb), the embedding server measured against FastLLM's /v1/embeddings, in a venv of
# its own (.cache/peers/infinity; torch pinned to the CPU wheel on this machine's disk). Its optimum engine runs
# the same MiniLM ONNX graph FastLLM serves, mean pooling, with its own batching (it sorts queued inputs by
# length, up to --batch-size each).
#   scripts/peers/infinity.sh install                  # install only
#   scripts/peers/infinity.sh PORT MODEL_DIR [ARGS]    # serve MODEL_DIR (an export with model.onnx) on PORT
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source scripts/peers/venv.sh infinity "torch==2.13.0" "infinity_emb[server,optimum]==0.0.78"
if [ "${1:-}" = install ]; then exit 0; fi
port="$1" model="$2"; shift 2
# Run from inside the model folder as "--model-id .": given a path, 0.0.78 passes optimum the ONNX file's full
# path as its file name, which optimum then cannot find in the folder.
server="$PWD/$peer_venv/bin/infinity_emb"
cd "$model"
HF_HUB_OFFLINE=1 exec "$server" v2 --model-id . --engine optimum --pooling-method mean \
  --host 127.0.0.1 --port "$port" --device cpu --no-bettertransformer "$@"

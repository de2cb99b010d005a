#!/usr/bin/env bash
# The HuggingFace peers' venv (transformers, optimum's ORTModelForCausalLM, ONNX Runtime GenAI,
# sentence-transformers on torch CPU) and the model folders they run, all under .cache/peers/:
#   smollm2-hf/    SmolLM2-135M-Instruct dequantized from the same Q4_1 GGUF FastLLM exports, fp32
#   genai-int4/    ONNX Runtime GenAI's builder on that folder: int4, accuracy level 4, block 32
# Prints nothing but errors; `source` it to get $peer_python.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source scripts/peers/venv.sh hf "torch==2.13.0" "transformers>=4.45,<4.58" "optimum-onnx[onnxruntime]==0.1.0" \
  "sentence-transformers>=3,<6" "gguf>=0.10" "accelerate" "onnxruntime-genai==0.12.2" "onnx" "onnx-ir"
gguf="$(scripts/fetch_smollm2.sh)"
if [ ! -f .cache/peers/smollm2-hf/config.json ]; then
  "$peer_python" - "$gguf" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf = Path(sys.argv[1])
out = Path(".cache/peers/smollm2-hf")
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32).save_pretrained(out)
PY
fi
if [ ! -f .cache/peers/genai-int4/genai_config.json ]; then
  "$peer_python" -m onnxruntime_genai.models.builder -i .cache/peers/smollm2-hf -o .cache/peers/genai-int4 \
    -p int4 -e cpu -c .cache/peers/genai-cache --extra_options int4_accuracy_level=4 int4_block_size=32 \
    > .cache/peers/genai-build.log 2>&1
fi

#!/usr/bin/env bash
# What to run when a machine with an NVIDIA GPU is at hand (onnxruntime-gpu installed, exports cached in
# .cache/test-exports by an earlier CPU run, so that nothing needs torch or optimum here):
#   scripts/gpu_check.sh [MODEL_FOLDER...]
# 1. the `gpu` tests, and the fused-graph generation tests with "auto" picking CUDA;
# 2. where each graph's nodes run (scripts/placement.py): a node CUDA has no kernel for runs on the CPU;
# 3. engine figures on CUDA for each MODEL_FOLDER (scripts/bench_engine.py), and a real server on CUDA
#    answering the official openai client, measured with `fastllm bench`.
# Output goes to stdout; set OUT to a folder to also keep the JSON reports there.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
status=0
python - <<'EOF'
import onnxruntime as ort, subprocess
print("onnxruntime", ort.__version__, ort.get_available_providers(), ort.get_device())
print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
EOF
# A test whose export is not cached exports it (the export extra); PYTEST_ADDOPTS can deselect those.
python -m pytest -q -rs -p no:cacheprovider tests/test_providers.py tests/test_fused.py 2>&1 \
  | tee "$out/pytest.log" || status=1
tiny=(.cache/test-exports/tiny-*-llama-graph=fused-* .cache/test-exports/tiny-*-llama-dtype=fp16-graph=fused-[0-9a-f]*
      .cache/test-exports/tiny-*-llama-dtype=fp16-graph=fused-quantize=int4-*)
python scripts/placement.py "${tiny[@]}" "$@" || status=1
[ $# -gt 0 ] || exit $status
python scripts/bench_engine.py "$@" --streams 4,8,16,32 --repeat 3 --providers CUDAExecutionProvider \
  --json "$out/engine-cuda.json" || status=1
model="$1"
python -m fastllm.cli serve --model "$model" --port 3077 --max-batch-size 32 >"$out/server.log" 2>&1 &
server=$!
python - <<'EOF'
import time, urllib.request
for _ in range(120):
    try:
        urllib.request.urlopen("http://127.0.0.1:3077/ready", timeout=2)
        break
    except OSError:
        time.sleep(1)
EOF
python - <<'EOF' || status=1
import openai
client = openai.OpenAI(base_url="http://127.0.0.1:3077/v1", api_key="x")
model = client.models.list().data[0]
print("served:", model.model_dump())
stream = client.chat.completions.create(model=model.id, stream=True, max_tokens=40, temperature=0,
                                        messages=[{"role": "user", "content": "What is the capital of France?"}])
print("answer:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
EOF
python -m fastllm.cli bench http://127.0.0.1:3077/v1 --concurrency 1,8,32 --repeat 2 --max-tokens 128 \
  --json "$out/server-cuda.json" || status=1
kill $server
grep -i -E "warn|error|provider" "$out/server.log" | head -20
exit $status

#!/usr/bin/env bash
# The whole comparison, one server at a time on this machine, written to docs/benchmarks.md (+ .png, .json):
#   scripts/benchmarks.sh            # ~1 h on 2 cores; ~2 h the first time (peer installs, llama.cpp builds)
#   RESUME=1 scripts/benchmarks.sh   # keep the results already in .cache/bench, run only what is missing
#   SKIP=llama_server,interleaved,long_prompts,embeddings scripts/benchmarks.sh  # keep those pages as they are
#
# Server level (`fastllm bench`, streamed chat, 1/2/4/8/16 clients): FastLLM fused int4 against llama.cpp's
# native llama-server (parallel slots; Q4_0 and the original file) on SmolLM2-135M and Qwen2.5-Coder-0.5B
# (scripts/bench_llama_server.sh; round by round at 1 and 8 clients: scripts/bench_interleaved.sh), FastLLM
# fused fp32, and llama-cpp-python's server (serial). Engine level (single stream, no HTTP): ours, ONNX Runtime
# GenAI, optimum's ORTModelForCausalLM, transformers' generate and llama.cpp. Embeddings: FastLLM's server vs
# sentence-transformers on torch CPU and, under load, Infinity (scripts/bench_embeddings.sh). Long prompts and
# conversations against llama-server (scripts/bench_long_prompts.sh). Every peer runs from its own venv under
# .cache/peers/; none is a dependency of FastLLM. Nothing else should run meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh all
threads="${THREADS:-$(nproc)}"
levels="${LEVELS:-1,2,4,8,16}"
repeat="${REPEAT:-3}"
max_tokens="${MAX_TOKENS:-128}"
out=.cache/bench
[ -n "${RESUME:-}" ] || rm -rf "$out"
mkdir -p "$out"
gguf="$(scripts/fetch_smollm2.sh)"
minilm="$(scripts/fetch_minilm.sh)"

# Exports are cached per version of the export code (as the tests' exports are).
# shellcheck disable=SC1091
source scripts/wait_ready.sh
models="$bench_models"
export_once() {
  local name="$1"; shift
  [ -f "$models/$name/fastllm.json" ] || fastllm export "$@" -o "$models/$name" --force --no-validate >&2
}
export_once smollm2-fused-fp32 "$gguf" --graph fused --name SmolLM2-135M-Instruct
export_once smollm2-fused-int4 "$gguf" --graph fused --quantize int4 --name SmolLM2-135M-Instruct
export_once minilm "$minilm" --name all-MiniLM-L6-v2
export_once qwen-coder-fused-int4 "$(scripts/fetch_qwen_coder.sh)" --graph fused --quantize int4 \
  --name Qwen2.5-Coder-0.5B-Instruct

echo "== peers' venvs" >&2
scripts/peers/hf.sh
hf_python=.cache/peers/hf/bin/python
# shellcheck disable=SC1091
source scripts/peers/llamacpp_venv.sh
llama_python="$peer_python"

bench_server() {  # LABEL PORT ARGS... -- then the server command after "--"
  local label="$1" port="$2"; shift 2
  local args=(); while [ "$1" != "--" ]; do args+=("$1"); shift; done; shift
  [ -f "$out/server-$label.json" ] && return 0
  start_server "$port" "$out/server-$label.log" "$@"
  echo "== $label" >&2
  fastllm bench "http://127.0.0.1:$port/v1" --label "$label" --repeat "$repeat" "${args[@]}" \
    --json "$out/server-$label.json" >&2
  stop_server
}
# llama.cpp's Python server ignores ignore_eos: banning SmolLM2's end tokens (<|endoftext|>, <|im_end|>)
# by logit_bias makes every server answer max_tokens tokens.
chat=(--concurrency "$levels" --requests 1 --max-tokens "$max_tokens" --ban-tokens 0,2)
bench_server "FastLLM fused fp32" 8101 "${chat[@]}" -- \
  fastllm serve --model "$models/smollm2-fused-fp32" --port 8101 --threads "$threads" --max-batch-size 16 \
  --log-level warning
bench_server "llama-cpp-python server (Q4_1, serial)" 8103 "${chat[@]}" -- \
  scripts/peers/llamacpp_server.sh 8103 "$threads"
bench_server "FastLLM MiniLM" 8104 --embeddings --concurrency 1,8,32 -- \
  fastllm serve --model "$models/minilm" --port 8104 --threads "$threads" --log-level warning

echo "== engine level" >&2
# This machine's speed drifts by ±15% over minutes, so the head-to-head rows run interleaved, ENGINE_ROUNDS
# times (ours, GenAI, llama.cpp, ours, ...), and the page shows each row's median over the rounds.
peer() { local py="$1" name="$2" round="$3"; shift 3; [ -f "$out/engine-$name.$round.json" ] && return 0
  "$py" scripts/peers/bench_engines.py "$name" "$@" \
  --threads "$threads" --repeat "$repeat" --json "$out/engine-$name.$round.json" >&2; }
for round in $(seq "${ENGINE_ROUNDS:-3}"); do
  [ -f "$out/engine-fastllm.$round.json" ] || python scripts/bench_engine.py "$models/smollm2-fused-fp32" \
    "$models/smollm2-fused-int4" --threads "$threads" --streams 4,8 --repeat "$repeat" \
    --json "$out/engine-fastllm.$round.json" >&2
  peer "$hf_python" genai "$round" .cache/peers/genai-int4
  peer "$llama_python" llamacpp "$round" "$gguf"
done
peer "$hf_python" optimum 1 .cache/peers/smollm2-hf
peer "$hf_python" transformers 1 .cache/peers/smollm2-hf
peer "$hf_python" sentence-transformers 1 "$minilm"

echo "== where a decode step's time goes" >&2
[ -f "$out/profile.json" ] || python scripts/profile_step.py "$models/smollm2-fused-int4" \
  "$models/qwen-coder-fused-int4" --batch 1,8 --threads "$threads" --json "$out/profile.json" >&2

echo "== structured outputs" >&2
python scripts/bench_structured.py "$models/smollm2-fused-int4" "$models/qwen-coder-fused-int4" --threads "$threads" \
  --repeat "$repeat" --json "$out/structured.json" --markdown docs/benchmarks-structured.md >&2

# The parts with pages of their own (FastLLM int4 against the native llama-server on SmolLM2 and Qwen2.5-Coder-0.5B,
# the same alternating round by round, long prompts, embeddings against Infinity); SKIP=llama_server,interleaved,
# long_prompts,embeddings keeps a page already written.
for part in llama_server interleaved long_prompts embeddings; do
  case ",${SKIP:-}," in *",$part,"*) echo "== $part: skipped, its page is kept" >&2 ;; *) scripts/bench_$part.sh ;; esac
done

for py in python "$hf_python" "$llama_python"; do "$py" -m pip list --format json; done > "$out/versions.jsonl"
python scripts/benchmarks_doc.py "$out" docs
echo "wrote docs/benchmarks.md" >&2

#!/usr/bin/env bash
# Speculative decoding, one client, FastLLM against llama.cpp's own llama-server, one server at a time on this
# machine, written to docs/benchmarks-speculative.md (see scripts/bench_speculative.py for what is measured):
#   scripts/bench_speculative.sh                       # Qwen2.5-Coder 0.5B and 1.5B, ~25 min on 2 cores
#   MODELS=qwen-coder scripts/bench_speculative.sh     # one of them
# FastLLM serves the fused int4 export with [model] speculative "off", then "ngram" (prompt lookup), and for the
# 1.5B "draft" (Qwen2.5-Coder-0.5B int4 drafting, at most 8 tokens a step).
# llama-server (1 slot, built once by scripts/peers/llama_server.sh) serves the same GGUF requantized to Q4_0,
# plain, with its own n-gram speculation (--spec-type ngram-simple) and, for the 1.5B, with the 0.5B as
# --model-draft. Nothing else should run meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh all
# shellcheck disable=SC1091
source scripts/wait_ready.sh
models="$bench_models"
threads="${THREADS:-$(nproc)}"
repeat="${REPEAT:-3}"
out=.cache/bench-speculative
mkdir -p "$out"
llama_bin="$(scripts/peers/llama_server.sh build)"

bench() {  # LABEL PORT JSON -- SERVER COMMAND...
  local label="$1" port="$2" json="$3"; shift 4
  start_server "$port" "$json.log" "$@"
  python scripts/bench_speculative.py "http://127.0.0.1:$port/v1" --label "$label" --repeat "$repeat" \
    --json "$json" >&2
  stop_server
}

merged=()
for name in ${MODELS:-qwen-coder qwen-coder-1.5b}; do
  case "$name" in
    qwen-coder) gguf="$(scripts/fetch_qwen_coder.sh)"; title="Qwen2.5-Coder-0.5B-Instruct" ;;
    qwen-coder-1.5b) gguf="$(scripts/fetch_qwen_coder.sh 1.5b)"; title="Qwen2.5-Coder-1.5B-Instruct" ;;
  esac
  [ -f "$models/$name-fused-int4/fastllm.json" ] || fastllm export "$gguf" --graph fused --quantize int4 \
    --name "$title" -o "$models/$name-fused-int4" --force --no-validate >&2
  q4_0="$out/$name.Q4_0.gguf"
  [ -f "$q4_0" ] || "$llama_bin/llama-quantize" --allow-requantize "$gguf" "$q4_0" Q4_0 >&2
  modes="off ngram"
  # The 1.5B also drafts with the 0.5B (same tokenizer): speculative "draft", and llama-server's --model-draft.
  [ "$name" = qwen-coder-1.5b ] && modes="off ngram draft" && draft="$models/qwen-coder-fused-int4" \
    && draft_q4_0="$out/qwen-coder.Q4_0.gguf"
  for mode in $modes; do
    if [ "$mode" = draft ]; then
      [ -f "$draft/fastllm.json" ] || fastllm export "$(scripts/fetch_qwen_coder.sh)" --graph fused --quantize int4 \
        --name Qwen2.5-Coder-0.5B-Instruct -o "$draft" --force --no-validate >&2
      [ -f "$draft_q4_0" ] || "$llama_bin/llama-quantize" --allow-requantize "$(scripts/fetch_qwen_coder.sh)" \
        "$draft_q4_0" Q4_0 >&2
    fi
    bench "FastLLM $title int4, speculative $mode" 8301 "$out/$name-fastllm-$mode.json" -- \
      env FASTLLM_MODEL__SPECULATIVE="$mode" FASTLLM_MODEL__DRAFT_MODEL="${draft:-}" FASTLLM_MODEL__SPECULATIVE_TOKENS="$([ "$mode" = draft ] && echo 8 || echo 32)" \
      fastllm serve --model "$models/$name-fused-int4" --port 8301 --threads "$threads" --log-level warning
    merged+=(--merge "$out/$name-fastllm-$mode.json")
  done
  bench "llama-server $title Q4_0" 8302 "$out/$name-llama.json" -- \
    scripts/peers/llama_server.sh 8302 "$threads" 1 "$q4_0"
  bench "llama-server $title Q4_0, --spec-type ngram-simple" 8302 "$out/$name-llama-ngram.json" -- \
    scripts/peers/llama_server.sh 8302 "$threads" 1 "$q4_0" --spec-type ngram-simple
  merged+=(--merge "$out/$name-llama.json" --merge "$out/$name-llama-ngram.json")
  if [[ " $modes " == *" draft "* ]]; then
    bench "llama-server $title Q4_0, --model-draft 0.5B Q4_0" 8302 "$out/$name-llama-draft.json" -- \
      scripts/peers/llama_server.sh 8302 "$threads" 1 "$q4_0" --model-draft "$draft_q4_0"
    merged+=(--merge "$out/$name-llama-draft.json")
  fi
done
{
  echo "# Speculative decoding"
  echo
  echo "$(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(date +%F); \`scripts/bench_speculative.sh\`."
  echo "One client, greedy, streamed chat; decode tokens/s (answer tokens over first-to-last token time), median"
  echo "of $repeat runs (\`scripts/bench_speculative.py\`)."
  echo
  python scripts/bench_speculative.py "${merged[@]}"
} > docs/benchmarks-speculative.md
echo "wrote docs/benchmarks-speculative.md" >&2

#!/usr/bin/env bash
# Long prompts and conversations, FastLLM against llama.cpp's own llama-server, one server at a time on this
# machine, written to docs/benchmarks-long-prompts.md (see scripts/bench_prompts.py for what is measured):
#   scripts/bench_long_prompts.sh                 # SmolLM2-135M and Qwen2.5-Coder-0.5B, ~30 min on 2 cores
#   MODELS=smollm2 scripts/bench_long_prompts.sh  # one of them
# FastLLM serves the fused int4 export with its defaults (prefill_beside = "auto": on where the graphs take at most
# an eighth of the memory, then a prompt arriving while others decode is read beside their steps); then reading it in
# chunks between the steps instead (prefill_beside = false, chunks sized by prefill_stall_ratio = 3; and fixed
# 256-token chunks, prefill_stall_ratio = 0; the arrival only); with prompts read by the int4 graph instead of the
# export's int8 prompt graph (prefill_graph = false, cold and warm prompts only); "before" is the same server with the
# prefix cache off and no chunked prefill. llama-server (8 slots, built once by scripts/peers/llama_server.sh) serves the same GGUF
# requantized to Q4_0, its fastest CPU format. Nothing else should run meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh all
# shellcheck disable=SC1091
source scripts/wait_ready.sh
models="$bench_models"
threads="${THREADS:-$(nproc)}"
out=.cache/bench-long
mkdir -p "$out"
llama_bin="$(scripts/peers/llama_server.sh build)"

bench() {  # LABEL PORT JSON PARTS -- SERVER COMMAND...
  local label="$1" port="$2" json="$3" parts="$4"; shift 5
  start_server "$port" "$json.log" "$@"
  python scripts/bench_prompts.py "http://127.0.0.1:$port/v1" --label "$label" --json "$json" --parts "$parts" >&2
  stop_server
}
all=sizes,chat,arrival

merged=()
for name in ${MODELS:-smollm2 qwen-coder}; do
  case "$name" in
    smollm2) gguf="$(scripts/fetch_smollm2.sh)"; title="SmolLM2-135M-Instruct" ;;
    qwen-coder) gguf="$(scripts/fetch_qwen_coder.sh)"; title="Qwen2.5-Coder-0.5B-Instruct" ;;
  esac
  [ -f "$models/$name-fused-int4/fastllm.json" ] || fastllm export "$gguf" --graph fused --quantize int4 \
    --name "$title" -o "$models/$name-fused-int4" --force --no-validate >&2
  q4_0="$out/$name.Q4_0.gguf"
  [ -f "$q4_0" ] || "$llama_bin/llama-quantize" --allow-requantize "$gguf" "$q4_0" Q4_0 >&2
  serve=(fastllm serve --model "$models/$name-fused-int4" --port 8201 --threads "$threads" --max-batch-size 16
         --log-level warning)
  bench "FastLLM $title int4" 8201 "$out/$name-fastllm.json" "$all" -- "${serve[@]}"
  bench "FastLLM $title int4, chunks between the decode steps (prefill_beside false)" 8201 \
    "$out/$name-fastllm-chunks.json" arrival -- env FASTLLM_RUNTIME__PREFILL_BESIDE=false "${serve[@]}"
  bench "FastLLM $title int4, fixed chunks of 256 (prefill_beside false, prefill_stall_ratio 0)" 8201 \
    "$out/$name-fastllm-fixed.json" arrival -- env FASTLLM_RUNTIME__PREFILL_BESIDE=false \
    FASTLLM_RUNTIME__PREFILL_STALL_RATIO=0 "${serve[@]}"
  bench "FastLLM $title int4, prompts through the int4 graph (prefill_graph false)" 8201 \
    "$out/$name-fastllm-int4-prompts.json" sizes -- env FASTLLM_RUNTIME__PREFILL_GRAPH=false "${serve[@]}"
  bench "FastLLM $title int4, no prefix cache or chunking" 8201 "$out/$name-fastllm-before.json" "$all" -- \
    env FASTLLM_RUNTIME__PREFIX_CACHE_MB=0 FASTLLM_RUNTIME__PREFILL_CHUNK_TOKENS=1000000 \
    FASTLLM_RUNTIME__PREFILL_STALL_RATIO=0 "${serve[@]}"
  bench "llama-server $title Q4_0" 8202 "$out/$name-llama.json" "$all" -- \
    scripts/peers/llama_server.sh 8202 "$threads" 8 "$q4_0"
  merged+=(--merge "$out/$name-fastllm.json" --merge "$out/$name-fastllm-chunks.json" --merge "$out/$name-fastllm-fixed.json"
           --merge "$out/$name-fastllm-int4-prompts.json" --merge "$out/$name-fastllm-before.json"
           --merge "$out/$name-llama.json")
done
{
  echo "# Long prompts and conversations"
  echo
  echo "$(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(date +%F); \`scripts/bench_long_prompts.sh\`."
  echo "Times to first token of streamed chat completions, greedy, from the wire (\`scripts/bench_prompts.py\`)."
  echo
  python scripts/bench_prompts.py "${merged[@]}"
} > docs/benchmarks-long-prompts.md
echo "wrote docs/benchmarks-long-prompts.md" >&2

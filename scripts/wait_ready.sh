# Sourced by the benchmark scripts, which run one server at a time.
# wait_ready URL PID: wait (up to 5 min) until URL answers, failing early if the server process PID has exited.
wait_ready() {
  for _ in $(seq 600); do
    curl -sf "$1" > /dev/null && return 0
    kill -0 "$2" 2> /dev/null || { echo "server $2 exited" >&2; return 1; }
    sleep 0.5
  done
  echo "no answer from $1" >&2; return 1
}

# start_server PORT LOG COMMAND...: run an OpenAI-compatible server in the background until it answers on PORT;
# stop_server ends it.
start_server() {
  local port="$1" log="$2"; shift 2
  "$@" > "$log" 2>&1 &
  server_pid=$!
  wait_ready "http://127.0.0.1:$port/v1/models" "$server_pid"
}
stop_server() { kill -TERM "$server_pid"; wait "$server_pid" || true; }

# Where the benchmarks keep their exports: one folder per version of the export code, as the tests' cache.
bench_models=".cache/bench-models/$(cat fastllm/export/*.py fastllm/manifest.py | sha256sum | cut -c1-12)"

# bench_pair NAME (smollm2 or qwen-coder), with $models and $llama_bin set: the GGUF ($gguf), its title ($title), the
# end tokens to ban ($ban), the format it comes in ($original); exports the fused int4 into $models/NAME-fused-int4
# and requantizes the GGUF to Q4_0 for llama-server ($q4_0) where they are missing.
bench_pair() {
  case "$1" in
    smollm2) gguf="$(scripts/fetch_smollm2.sh)"; title="SmolLM2-135M"; ban=0,2; original=Q4_1 ;;
    qwen-coder) gguf="$(scripts/fetch_qwen_coder.sh)"; title="Qwen2.5-Coder-0.5B"; ban=151643,151645
                original=Q4_K_M ;;
    *) echo "unknown model $1 (smollm2, qwen-coder)" >&2; return 1 ;;
  esac
  [ -f "$models/$1-fused-int4/fastllm.json" ] || fastllm export "$gguf" --graph fused --quantize int4 \
    --name "$title-Instruct" -o "$models/$1-fused-int4" --force --no-validate >&2
  mkdir -p .cache/bench-llama-server
  q4_0=".cache/bench-llama-server/$1.Q4_0.gguf"
  [ -f "$q4_0" ] || "$llama_bin/llama-quantize" --allow-requantize "$gguf" "$q4_0" Q4_0 >&2
}

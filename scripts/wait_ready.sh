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

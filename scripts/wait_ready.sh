# Sourced by the benchmark scripts: wait_ready URL PID waits (up to 5 min) until URL answers, failing early
# if the server process PID has exited.
wait_ready() {
  for _ in $(seq 600); do
    curl -sf "$1" > /dev/null && return 0
    kill -0 "$2" 2> /dev/null || { echo "server $2 exited" >&2; return 1; }
    sleep 0.5
  done
  echo "no answer from $1" >&2; return 1
}

#!/usr/bin/env bash
# FastLLM against llama-server, round by round: each round measures one server and then the other, and the table
# gives each round's ratio and their median. On a shared 2-core VM the machine's speed drifts by 20-30% over
# minutes (the same FastLLM build gave 120, 132 and 162 tok/s to one client in three runs in a row), so a whole
# sweep of one server and then the other (scripts/bench_llama_server.sh) can land in different phases; here both
# see every phase alike. Written to docs/benchmarks-interleaved.md (and its medians to .json, for docs/benchmarks.md):
#   scripts/bench_interleaved.sh                          # SmolLM2-135M and Qwen2.5-Coder-0.5B, 7 rounds, ~7 min
#   ROUNDS=5 LEVELS=1,4,8 MODELS=smollm2 scripts/bench_interleaved.sh
# Same load as scripts/bench_llama_server.sh (streamed chat, 128 greedy tokens, end tokens banned), llama-server
# with 16 slots on the GGUF requantized to Q4_0. Nothing else should run meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh all
# shellcheck disable=SC1091
source scripts/wait_ready.sh
models="$bench_models"
threads="${THREADS:-$(nproc)}"
levels="${LEVELS:-1,8}"
rounds="${ROUNDS:-7}"
out=.cache/bench-interleaved
rm -rf "$out" && mkdir -p "$out"
llama_bin="$(scripts/peers/llama_server.sh build)"

measure() {  # LABEL PORT BAN JSON -- SERVER COMMAND...
  local label="$1" port="$2" ban="$3" json="$4"; shift 5
  start_server "$port" "$json.log" "$@"
  fastllm bench "http://127.0.0.1:$port/v1" --label "$label" --concurrency "$levels" --requests 1 --repeat 1 \
    --max-tokens 128 --ban-tokens "$ban" --json "$json" >&2
  stop_server
}

for name in ${MODELS:-smollm2 qwen-coder}; do
  bench_pair "$name"  # $title, $ban, $q4_0 (scripts/wait_ready.sh)
  for round in $(seq "$rounds"); do
    measure "FastLLM $title int4" 8401 "$ban" "$out/$name-fastllm-$round.json" -- fastllm serve \
      --model "$models/$name-fused-int4" --port 8401 --threads "$threads" --max-batch-size 16 --log-level warning
    measure "llama-server $title Q4_0" 8402 "$ban" "$out/$name-llama-$round.json" -- \
      scripts/peers/llama_server.sh 8402 "$threads" 16 "$q4_0"
  done
done
python - "$out" "$rounds" <<'PY' > docs/benchmarks-interleaved.md
import json, statistics, subprocess, sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
levels: dict[tuple[str, str, int, int], dict] = {}  # (model, server, round, clients) -> level summary
titles: dict[str, str] = {}
for path in sorted(out.glob("*.json")):
    model, server, round_ = path.stem.rsplit("-", 2)
    run = json.loads(path.read_text())["runs"][0]
    titles[model] = run["label"].removeprefix("FastLLM ").removeprefix("llama-server ").rsplit(" ", 1)[0]
    for level in run["levels"]:
        levels[(model, server, int(round_), level["concurrency"])] = level
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
machine = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
print("# FastLLM against llama-server, interleaved\n")
print(f"{machine}; `scripts/bench_interleaved.sh`: {rounds} rounds, each measuring FastLLM (fused int4) and then "
      "llama-server (16 slots, Q4_0) with `fastllm bench` (streamed chat, 128 greedy tokens per answer, one request "
      "per client). Ratios are FastLLM's tokens/s over llama-server's in the same round.\n")
print("| model | clients | FastLLM tok/s, each round | llama-server tok/s, each round | ratio, each round | "
      "median ratio | TTFT p50 ms, FastLLM / llama-server (medians) |")
print("|---|---|---|---|---|---|---|")
medians = []  # what docs/benchmarks.md's headline takes
for model, title in titles.items():
    for clients in sorted({key[3] for key in levels if key[0] == model}):
        ours = [levels[(model, "fastllm", r, clients)] for r in range(1, rounds + 1)]
        theirs = [levels[(model, "llama", r, clients)] for r in range(1, rounds + 1)]
        ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(ours, theirs, strict=True)]
        ttft = [statistics.median(x["ttft_p50_ms"] for x in side) for side in (ours, theirs)]
        cells = [" / ".join(f"{x['tok_s']:g}" for x in side) for side in (ours, theirs)]
        each = " / ".join(f"{r:.2f}" for r in ratios)
        print(f"| {title} | {clients} | {cells[0]} | {cells[1]} | {each} | **{statistics.median(ratios):.2f}×** | "
              f"{ttft[0]:.1f} / {ttft[1]:.1f} |")
        medians.append({"model": title, "clients": clients, "ratio": round(statistics.median(ratios), 2),
                        "ttft_p50_ms": [round(t, 1) for t in ttft]})
Path("docs/benchmarks-interleaved.json").write_text(json.dumps(medians, indent=1) + "\n")
PY
echo "wrote docs/benchmarks-interleaved.md" >&2

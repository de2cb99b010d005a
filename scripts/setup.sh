# Sourced by the other scripts: create .venv (once) and install fastllm with the extras asked for.
#   source scripts/setup.sh serve     # serving only
#   source scripts/setup.sh all       # serve + export + ray + dev (tests)
# torch is pinned to 2.13.0 because that CPU wheel is what this project's machines carry offline;
# any other version would download gigabytes of CUDA libraries.
want="${1:-all}"
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=".venv/.fastllm-$want-$(cat pyproject.toml | sha256sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  case "$want" in
    serve) python -m pip install -q -e ".[serve]" ;;
    *) python -m pip install -q "torch==2.13.0" && python -m pip install -q -e ".[serve,export,dev,ray]" ;;
  esac
  touch "$stamp"
fi

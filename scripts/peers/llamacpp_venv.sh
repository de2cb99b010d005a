# Sourced: llama-cpp-python[server] in a venv of its own, compiled from PyPI's sdist (~10 min on 2 cores, once) with
# ggml_cflags; sets peer_python. CMake takes CFLAGS/CXXFLAGS as its first flags, and the venv's stamp includes them,
# so a venv built with other flags is rebuilt. No pip cache: a wheel built with other flags would be taken as is.
# shellcheck disable=SC1091
source scripts/peers/ggml_flags.sh
CFLAGS="$ggml_cflags" CXXFLAGS="$ggml_cflags" PIP_NO_CACHE_DIR=1 peer_flags="$ggml_cflags" \
  source scripts/peers/venv.sh llamacpp "llama-cpp-python[server]==0.3.36"

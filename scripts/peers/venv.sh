# Sourced by the peer scripts: make (once) a virtual environment of its own under .cache/peers/NAME and
# install the packages given, so that no peer is ever a dependency of FastLLM or shares its venv.
#   source scripts/peers/venv.sh NAME PACKAGE...
peer_name="$1"; shift
peer_venv=".cache/peers/$peer_name"
peer_stamp="$peer_venv/.installed-$(echo "$*${peer_flags:+ $peer_flags}" | sha256sum | cut -c1-12)"
if [ ! -f "$peer_stamp" ]; then
  python3 -m venv --clear "$peer_venv"  # what an older install left (other flags, other versions) goes
  "$peer_venv/bin/python" -m pip install -q --upgrade pip
  "$peer_venv/bin/python" -m pip install -q "$@"
  touch "$peer_stamp"
fi
peer_python="$peer_venv/bin/python"

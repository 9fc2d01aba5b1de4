#!/usr/bin/env bash
# Create a separate virtual environment with FlorDB for the side-by-side benchmark.
#
#   bash bench/flordb/setup.sh            # -> bench/.venv-flordb (or $FLORDB_VENV)
#
# torch is pinned and installed FIRST: an unpinned torch would pull the CUDA build
# (gigabytes). With the CPU wheel in place, `pip install flordb` keeps it.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${FLORDB_VENV:-$HERE/../.venv-flordb}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  # Use the interpreter the project's venv was built from, so both sides run the same Python.
  if [ -x "$HERE/../../.venv/bin/python" ]; then
    PY="$("$HERE/../../.venv/bin/python" -c 'import sys; print(sys._base_executable)')"
  else
    PY="$(command -v python3)"
  fi
fi
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
FLORDB_VERSION="${FLORDB_VERSION:-4.0.1}"

# Importing flordb inside a git repository makes FlorDB take it over (it switches it to a
# flor.* branch and auto-commits everything at exit): check imports from an empty folder.
CHECK_DIR="$(mktemp -d)"
trap 'rm -rf "$CHECK_DIR"' EXIT
check() { (cd "$CHECK_DIR" && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('flordb', 'torch', 'sklearn')) else 1)"); }
if [ -x "$VENV/bin/python" ] && check 2>/dev/null; then
  echo "flordb venv ready: $VENV"
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==${TORCH_VERSION}"
"$VENV/bin/pip" install --quiet "flordb==${FLORDB_VERSION}" scikit-learn numpy
check
"$VENV/bin/python" -c "import importlib.metadata as m; print('flordb venv ready: $VENV; flordb', m.version('flordb'), 'torch', m.version('torch'))"

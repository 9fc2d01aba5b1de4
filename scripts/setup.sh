#!/usr/bin/env bash
# Set up a development environment in .venv: CPU torch (unless a torch is already there),
# flor_nb with its test extras, and Debian's chromium for the browser tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# An unpinned torch pulls GBs of CUDA packages: install the CPU build first where none is present.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: /usr/bin/chromium is missing; install Debian's chromium for the browser tests" >&2
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch, flor_nb; print("torch", torch.__version__, "flor_nb", flor_nb.__version__)'))"

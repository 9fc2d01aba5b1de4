#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index (the device tool's machines): flor_nb
# itself and what its GPU tests need that the machine's CUDA image lacks (Jupyter kernel and client,
# ipywidgets, anywidget, nbconvert), for its Python 3.12, at the versions of this checkout's .venv.
# Writes .whl/ (git-ignored); bench/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl .
freeze=$(.venv/bin/python -m pip freeze)
for p in anywidget psygnal asttokens comm debugpy executing fastjsonschema ipykernel ipython \
         ipython_pygments_lexers ipywidgets jedi jupyter_client jupyter_core jupyterlab_widgets \
         widgetsnbextension matplotlib-inline nbclient nbformat nbconvert bleach defusedxml mistune \
         pandocfilters tinycss2 beautifulsoup4 soupsieve webencodings jupyterlab_pygments nest-asyncio2 \
         parso pexpect ptyprocess platformdirs prompt_toolkit pure_eval pyzmq referencing rpds-py \
         jsonschema jsonschema-specifications stack-data tornado traitlets wcwidth; do
  v=$(grep -i "^$p==" <<<"$freeze" | cut -d= -f3)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p==$v" 2>/dev/null
done
du -sh .whl

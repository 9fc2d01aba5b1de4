#!/usr/bin/env bash
# The GPU check, in one call on a machine with CUDA and no package index (see scripts/device_wheels.sh):
# the CUDA tests (tests/test_gpu.py, test_device.py, test_nanogpt.py) and bench/gpu.py. Logs go to $OUT
# (or ./gpu-out). Each part runs even if an earlier one failed. TESTS and BENCH_ARGS narrow a rerun.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
PY=${PY:-python3}
$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHEELS:-.whl/*.whl} \
  || exit 1
export PYTHONPATH=/tmp/site
# tests/test_nanogpt.py reads nanoGPT's train.py and model.py from a carried, git-ignored .nanogpt/ (public code
# stays out of the repository); without it that test is skipped
[ -f .nanogpt/train.py ] && export FLOR_NANOGPT=$PWD/.nanogpt
mv flor_nb flor_nb.src  # import the installed wheel (with flor_nb.extension), not the bare source folder
$PY -c "import torch, flor_nb, flor_nb.extension, ipykernel, nbclient; print('torch', torch.__version__, \
  torch.cuda.get_device_name(), 'flor_nb from', flor_nb.__file__)" 2>&1 | tee -a "$OUT/env.txt"
lscpu | grep -E "^CPU\(s\)|Model name" | tee -a "$OUT/env.txt"
# eval: TESTS may quote a -k expression, e.g. TESTS="tests/test_gpu.py -k 'not notebook'"
eval "timeout ${TESTS_S:-330} $PY -m pytest -q -p no:cacheprovider -rA -s --timeout 280 \
  ${TESTS:-tests/test_gpu.py tests/test_nanogpt.py tests/test_device.py}" 2>&1 | tee "$OUT/tests.log" | grep -v "^iter \|^step "
[ -n "${SKIP_BENCH:-}" ] || timeout "${BENCH_S:-150}" $PY bench/gpu.py ${BENCH_ARGS:---reps 3 --epochs 6 --n 32768 --gb 1.0} --json "$OUT/gpu.json" 2>&1 \
  | tee "$OUT/bench.log"
mv flor_nb.src flor_nb

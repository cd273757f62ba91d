#!/usr/bin/env bash
# One command on an offline GPU node: install kosmos from a wheelhouse (launch/wheelhouse.sh), then
# check and measure the GPU path. About 8 minutes on one H100; writes one JSON and one log.
#
#   launch/gpu_selfcheck.sh WHEELHOUSE [OUT]           # OUT default: selfcheck
#
# Run from the repository (the GPU tests are in tests/, not in the wheel), in the node's own Python
# environment. It makes OUT/venv with --system-site-packages, so the image's torch, CUDA and NCCL are
# the ones used, installs kosmos there with pip --no-index from WHEELHOUSE (nothing is fetched), and
# runs, each within its own time limit:
#   1. `kosmos bench gpu` on the paper config (attention backends checked against the reference and
#      timed, training per ZeRO stage and on packed rows, decoding): OUT/bench_gpu.json
#   2. `pytest -m gpu tests/`: the tests that need CUDA
# Everything printed goes to OUT/selfcheck.log as well. The exit status is 0 when both passed.
# Environment: BENCH_BUDGET (seconds for the benchmark, default 330), PYTEST_TIMEOUT (default 240),
# VENV (an existing environment to install into instead of OUT/venv).
set -uo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 WHEELHOUSE [OUT]" >&2
  exit 2
fi
wheelhouse=$(realpath "$1") out=${2:-selfcheck}
python=${PYTHON:-python}
mkdir -p "$out"
log=$out/selfcheck.log
exec > >(tee "$log") 2>&1

echo "== $(date -u +%FT%TZ) $(hostname): $("$python" --version), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
if [[ -z ${VENV:-} ]]; then
  VENV=$out/venv
  "$python" -m venv --system-site-packages "$VENV" || exit 1
fi
venv=$VENV/bin
if [[ -s $wheelhouse/requirements.txt ]]; then
  "$venv/python" -m pip install --quiet --no-index --find-links "$wheelhouse" -r "$wheelhouse/requirements.txt" \
    || { echo "install from $wheelhouse failed"; exit 1; }
fi
"$venv/python" -m pip install --quiet --no-index --no-deps --force-reinstall --find-links "$wheelhouse" kosmos \
  || { echo "install of kosmos from $wheelhouse failed"; exit 1; }
"$venv/python" -c "import torch, deepspeed, kosmos; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'GPUs', torch.cuda.device_count(), 'DeepSpeed', deepspeed.__version__)"

status=0
echo "== kosmos bench gpu"
timeout $(( ${BENCH_BUDGET:-330} + 60 )) "$venv/kosmos" bench gpu --config configs/train/kosmos1.yaml \
  --out "$out/bench_gpu.json" --budget "${BENCH_BUDGET:-330}" || status=1
echo "== pytest -m gpu"
timeout "${PYTEST_TIMEOUT:-240}" "$venv/python" -m pytest -m gpu -q -rs tests/ || status=1
echo "== done ($status): $out/bench_gpu.json, $log"
exit $status

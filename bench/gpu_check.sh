#!/usr/bin/env bash
# bench/gpu_check.py on a machine that has torch and a GPU but not the project's other packages (a lent GPU
# machine without a registry): installs the wheels `make gpu-wheels` left in .whl/ into a private folder
# (GPU_SITE, default /tmp/site), puts it and the repository on PYTHONPATH, and runs the check. Arguments go
# to gpu_check.py; the figures go to $OUT/gpu.json when OUT is set (the device tool's result folder), else
# runs/gpu_check.json. The device tool's command (carry .whl; timeout leaving room for a rerun):
#   bash bench/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
# On a cluster node with the project's environment no wheels are needed:
#   srun --gres=gpu:1 --time=10 python bench/gpu_check.py --json runs/gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
site=${GPU_SITE:-/tmp/site}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no wheels in .whl/ (make gpu-wheels): using the packages this Python has" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
out=${OUT:-runs}
mkdir -p "$out"
json="$out/gpu.json"
[ -n "${OUT:-}" ] || json="$out/gpu_check.json"
PYTHONUNBUFFERED=1 exec "$PYTHON" bench/gpu_check.py --json "$json" "$@"

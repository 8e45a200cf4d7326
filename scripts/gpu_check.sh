#!/usr/bin/env bash
# Run on a machine with one CUDA GPU, from the repository root, after `make install` (≤ 8 minutes):
# the cuda-marked tests, then every backend training under the GPU's precision on the tiny model and
# SmolLM2 (exact bytes, peak vs estimate) -> scripts/gpu_check.json (or $OUT/gpu_check.json).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
timeout 300 "$PY" -m pytest -q -m cuda -p no:cacheprovider
timeout 240 "$PY" scripts/gpu_check.py "$@"

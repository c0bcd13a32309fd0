#!/usr/bin/env bash
# (e) The speed and memory benchmarks on a CUDA GPU: (a) training overhead, (b) check cost,
# (d) peak memory. Prints the device name first. Not run on a GPU yet; its CPU path
# (--device cpu, PAIRS=1) took 81 s on a 2-core VM.
#
# Run from the repository root:  bash benchmarks/gpu_check.sh            (default --device cuda)
#                                bash benchmarks/gpu_check.sh --device cpu   (the same on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--device" ]]; then DEVICE="$2"; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$DEVICE" == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
fi
set -x
python benchmarks/overhead.py --device "$DEVICE" --pairs "${PAIRS:-5}"
python benchmarks/check_cost.py --device "$DEVICE"
python benchmarks/memory.py --device "$DEVICE"

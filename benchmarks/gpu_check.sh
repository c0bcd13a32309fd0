#!/usr/bin/env bash
# The GPU check (issue 16): one short script, no download, every figure printed.
#   1. the calibration zoo (tests/zoo.py: correct models, planted and sparse bugs) in fp32
#      (float32 gradients, precision="auto"), bf16 autocast, and fp16 autocast with a
#      GradScaler (GradWatch(..., scaler=scaler));
#   2. (a) the training-overhead benchmark;  3. (b) the check-cost benchmark;
#   4. (d) the peak-memory benchmark;
#   5. a tiny transformer with SDPA attention dropout (dropout_p=0.1, control 0.0) checked by
#      GradWatch under bf16 and fp16 autocast: each report's verdict, reliability and reason;
#   6. module-local checks and the reference comparison of a custom attention op with planted
#      dq/dk/grad_output-contiguity bugs, fp32 and bf16 autocast (benchmarks/local_check.py);
#   7. the Hugging Face Trainer under FSDP2 (accelerate's fully_shard) with GradWatchTrainerCallback,
#      the model of examples/hf_trainer.py with its planted bug and fixed (benchmarks/hf_fsdp.py):
#      torchrun with one process per visible GPU (one GPU: an FSDP2 world of size 1 over NCCL, the
#      whole fully_shard path without sharding across ranks), 2 gloo processes with --device cpu.
# It prints the device name first and the seconds of each part; a failing part is reported
# and the others still run (the exit status is then 1). Needs torch, pytorch-lightning and
# tensorboard, and transformers + accelerate for part 7 (which fails, saying so, without them);
# about 5-8 minutes on one GPU (estimate: not yet run on a GPU).
#
# Run from the repository root:  bash benchmarks/gpu_check.sh                  (cuda, full sizes)
#                                bash benchmarks/gpu_check.sh --device cpu     (the same on CPU)
#                                bash benchmarks/gpu_check.sh --device cpu --quick
#                                   (tiny sizes: checks that every part runs, about 1.5 minutes on 2 cores)
# PYTHON=/path/to/python overrides the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
QUICK=${QUICK:-0}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--device cuda|cpu] [--quick]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$QUICK" == 1 ]]; then
  SEEDS=1; PAIRS=1; STEPS=20; REPEATS=1; SDPA_STEPS=1; COST_MODELS="mlp"; WIDTH=512; HF_STEPS=2; HF_EVERY=2
else
  SEEDS=3; PAIRS=5; STEPS=300; REPEATS=2; SDPA_STEPS=3; COST_MODELS="cnn transformer mlp"; WIDTH=2048; HF_STEPS=6; HF_EVERY=3
fi
if [[ "$DEVICE" == cuda* ]]; then
  NPROC=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
else
  NPROC=2
fi

echo "## device: $DEVICE (quick=$QUICK)"
if [[ "$DEVICE" == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PY" - "$DEVICE" <<'PYEOF' || exit 1
import sys, torch
device = sys.argv[1]
if device.startswith("cuda"):
    assert torch.cuda.is_available(), "no CUDA device"
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name(device),
          "capability", torch.cuda.get_device_capability(device))
    print("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32",
          torch.backends.cuda.matmul.allow_tf32, "cudnn.benchmark", torch.backends.cudnn.benchmark)
else:
    print("torch", torch.__version__, "CPU")
PYEOF

FAILED=()
TOTAL=$SECONDS
part() {  # part NAME COMMAND...: run one part, print its seconds, remember a failure
  local name="$1"; shift
  echo
  echo "## $name: $*"
  local start=$SECONDS
  if "$@"; then echo "# $name: ok, $((SECONDS - start)) s"; else echo "# $name: FAILED (exit $?), $((SECONDS - start)) s"; FAILED+=("$name"); fi
}

part calibration "$PY" benchmarks/calibration.py --device "$DEVICE" --seeds "$SEEDS" \
  --modes auto bf16-autocast fp16-gradscaler
part overhead "$PY" benchmarks/overhead.py --device "$DEVICE" --pairs "$PAIRS" --steps "$STEPS"
part check_cost "$PY" benchmarks/check_cost.py --device "$DEVICE" --repeats "$REPEATS" --models $COST_MODELS
part memory "$PY" benchmarks/memory.py --device "$DEVICE" --width "$WIDTH"
part sdpa_dropout "$PY" benchmarks/sdpa_dropout.py --device "$DEVICE" --steps "$SDPA_STEPS" --dtypes bfloat16 float16
part local_check "$PY" benchmarks/local_check.py --device "$DEVICE" --seeds "$SEEDS"
part hf_fsdp "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" benchmarks/hf_fsdp.py \
  --device "${DEVICE%%:*}" --steps "$HF_STEPS" --every "$HF_EVERY"

echo
echo "## total $((SECONDS - TOTAL)) s; failed parts: ${FAILED[*]:-none}"
[[ ${#FAILED[@]} -eq 0 ]]

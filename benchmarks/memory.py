"""(d) Peak memory of a training step with and without a gradwatch check.

The model is an MLP large enough for its parameters to dominate (4 x Linear(2048, 2048),
16.8M parameters, 64 MiB in float32). A check holds one float64 copy of the parameters and
buffers (the shadow, 2x the float32 bytes) plus, transiently, a few float64 tensors of
the size of the tensor being probed; the shadow is freed when the check returns.

CPU: each measurement runs in a fresh subprocess and reads its peak resident set size
(VmHWM in /proc/self/status), so allocations of the other measurement cannot hide in it;
the subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed tensor
memory to the system at once and the resident size follows the live tensors. "held
after" is the resident size after the check minus before it.
CUDA: torch.cuda.max_memory_allocated() around the training step, then around the check.
Rows: the default check (kinks recorded, so sequential evaluation) and kinks=False
(batched evaluation, which stacks the 4 perturbed copies of the probed tensor, plus the
unperturbed one on the first call).

Run:  python benchmarks/memory.py
      python benchmarks/memory.py --device cuda
      python benchmarks/memory.py --width 512      (quick: 4 x Linear(512, 512))
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from _common import add_common_args, header

MIB = 2**20


def _model_and_batch(device: str, width: int = 2048):
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(width, width), nn.Tanh()))).to(device)
    batch = (torch.randn(64, width, device=device), torch.randn(64, width, device=device))
    return model, batch


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")) / MIB


CHECKS = {"default (sequential)": {}, "kinks=False (batched)": {"kinks": False}}


def child(mode: str, device: str, width: int) -> None:
    model, batch = _model_and_batch(device, width)
    before = _vm("VmRSS")
    loss_fn(model, batch).backward()
    trained = _vm("VmRSS")
    evaluation = "-"
    if mode != "train":
        report = gradwatch.check(model, loss_fn, batch, grads="existing", seed=0, **CHECKS[mode])
        evaluation = report.evaluation
    print(f"{_vm('VmHWM') - before:.1f} {_vm('VmRSS') - trained:.1f} {evaluation}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--width", type=int, default=2048, help="width of the 4 Linear layers (default 2048)")
    parser.add_argument("--child", choices=["train", *CHECKS], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        return child(args.child, args.device, args.width)
    header(args)
    model, batch = _model_and_batch(args.device, args.width)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    copy64 = 8 * n / MIB
    print(f"# MLP 4 x Linear({args.width}, {args.width}): {n / 1e6:.1f}M parameters, {4 * n / MIB:.0f} MiB float32, "
          f"float64 copy {copy64:.0f} MiB, largest tensor in float64 {8 * largest / MIB:.0f} MiB")
    rows = {}
    if args.device.startswith("cuda"):
        print("# torch.cuda.max_memory_allocated, MiB above the model and batch")
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(model, batch).backward()
        rows["train"] = ((torch.cuda.max_memory_allocated() - base) / MIB, float("nan"), "-")
        for mode, kwargs in CHECKS.items():
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            report = gradwatch.check(model, loss_fn, batch, grads="existing", seed=0, **kwargs)
            peak = (torch.cuda.max_memory_allocated() - base) / MIB
            rows[mode] = (peak, (torch.cuda.memory_allocated() - before) / MIB, report.evaluation)
    else:
        print("# peak RSS (VmHWM) of a fresh process, MiB above its RSS after building the model and batch")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        for mode in ("train", *CHECKS):
            cmd = [sys.executable, __file__, "--child", mode, "--device", args.device, "--threads", str(args.threads),
                   "--width", str(args.width)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()
            rows[mode] = (float(out[-3]), float(out[-2]), out[-1])
    train = rows["train"][0]
    print(f"{'':24} {'peak':>8} {'check adds':>11} {'/ float64 copy':>15} {'held after':>11}  evaluation")
    for mode, (peak, held, evaluation) in rows.items():
        label = "training step" if mode == "train" else f"step + check {mode}"
        extra = peak - train
        print(f"{label:24} {peak:8.1f} {extra:11.1f} {extra / copy64:15.2f} {held:11.1f}  {evaluation}")
    print("# 'check adds' = peak with the check - peak of the training step alone; 'held after' = what the check "
          "left allocated (the shadow is freed)")


if __name__ == "__main__":
    main()

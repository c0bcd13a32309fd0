"""(d) Peak memory of a training step with and without a gradwatch check.

The model is an MLP large enough for its parameters to dominate (4 x Linear(2048, 2048),
16.8M parameters, 64 MiB in float32). A check holds one float64 copy of the parameters and
buffers (the shadow, 2x the float32 bytes) plus, transiently, a few float64 tensors of
the size of the tensor being probed; the shadow is freed when the check returns.

CPU: each measurement runs in a fresh subprocess and reads its peak resident set size
(VmHWM in /proc/self/status), so allocations of the other measurement cannot hide in it.
CUDA: torch.cuda.max_memory_allocated() around the training step, then around the check.

Run:  python benchmarks/memory.py
      python benchmarks/memory.py --device cuda
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from _common import add_common_args, header

MIB = 2**20


def _model_and_batch(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(2048, 2048), nn.Tanh()))).to(device)
    batch = (torch.randn(64, 2048, device=device), torch.randn(64, 2048, device=device))
    return model, batch


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")) / MIB


def child(mode: str, device: str) -> None:
    model, batch = _model_and_batch(device)
    before = _vm("VmRSS")
    loss_fn(model, batch).backward()
    if mode == "check":
        gradwatch.check(model, loss_fn, batch, grads="existing", seed=0)
    print(f"{_vm('VmHWM') - before:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--child", choices=["train", "check"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        return child(args.child, args.device)
    header(args)
    model, batch = _model_and_batch(args.device)
    n = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    print(f"# MLP 4 x Linear(2048, 2048): {n / 1e6:.1f}M parameters, {4 * n / MIB:.0f} MiB float32, "
          f"float64 copy {8 * n / MIB:.0f} MiB, largest tensor in float64 {8 * largest / MIB:.0f} MiB")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(model, batch).backward()
        train = (torch.cuda.max_memory_allocated() - base) / MIB
        torch.cuda.reset_peak_memory_stats()
        base2 = torch.cuda.memory_allocated()
        gradwatch.check(model, loss_fn, batch, grads="existing", seed=0)
        check_peak = (torch.cuda.max_memory_allocated() - base2) / MIB + (base2 - base) / MIB
        after = (torch.cuda.memory_allocated() - base2) / MIB
        how = "torch.cuda.max_memory_allocated, MiB above the model and batch"
    else:
        out = {}
        for mode in ("train", "check"):
            cmd = [sys.executable, __file__, "--child", mode, "--device", args.device, "--threads", str(args.threads)]
            out[mode] = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
        train, check_peak, after = out["train"], out["check"], float("nan")
        how = "peak RSS (VmHWM) in a fresh process, MiB above the RSS after building the model and batch"
    print(f"# {how}")
    print(f"{'training step':>14} {'step + check':>13} {'check adds':>11} {'/ float64 copy':>15} {'held after':>11}")
    extra = check_peak - train
    print(f"{train:14.1f} {check_peak:13.1f} {extra:11.1f} {extra / (8 * n / MIB):15.2f} {after:11.1f}")


if __name__ == "__main__":
    main()

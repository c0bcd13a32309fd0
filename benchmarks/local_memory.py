"""Peak memory of a module-local check (gradwatch.local) against a whole-model check.

The model is benchmark (d)'s MLP (4 x Linear(W, W) + Tanh, batch 64); the local check
watches one Linear (``2``, its parameters a quarter of the model's). Each measurement
runs in a fresh subprocess and reads its peak resident set size (VmHWM), with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensor memory goes back to the system at once
(as in benchmarks/memory.py).

Rows: the training step alone; the training step recorded for the local check (the
recording copies the module's input and output and keeps grad_out and grad_input: its
activations); a whole-model check (``gradwatch.check(grads="existing")``, float64); the
module-local check of the recorded module (float64). "adds" is the peak above the
training step's; "/ module float64 + activations" divides the local check's addition by
the module's float64 copy (parameters and recorded input) plus its recorded activations.

Run:  python benchmarks/local_memory.py
      python benchmarks/local_memory.py --width 512      (quick)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from _common import add_common_args, header
from gradwatch.local import _local_reports, _Recording

MIB = 2**20
MODES = ("train", "record", "whole", "local")


def _model_and_batch(width: int):
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(width, width), nn.Tanh())))
    return model, (torch.randn(64, width), torch.randn(64, width))


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")) / MIB


def child(mode: str, width: int) -> None:
    model, batch = _model_and_batch(width)
    before = _vm("VmRSS")
    seconds = float("nan")
    if mode == "train":
        loss_fn(model, batch).backward()
    else:
        rec = _Recording({"2": model[2]} if mode in ("record", "local") else {}, model=model)
        with rec:
            loss_fn(model, batch).backward()
        started = time.perf_counter()
        if mode == "whole":
            report = gradwatch.check(model, loss_fn, batch, grads="existing", seed=0, precision="float64")
            assert report.ok and report.precision == "float64", str(report)
        elif mode == "local":
            (report,) = _local_reports(rec, 0, {"precision": "float64"})
            assert report.ok and report.precision == "float64", str(report)
        seconds = time.perf_counter() - started
    print(f"{_vm('VmHWM') - before:.1f} {seconds:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--width", type=int, default=2048, help="width of the 4 Linear layers (default 2048)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        return child(args.child, args.width)
    header(args)
    w = args.width
    model, _ = _model_and_batch(w)
    n = sum(p.numel() for p in model.parameters())
    module64 = 8 * (w * w + w + 64 * w) / MIB  # parameters and the recorded input in float64
    acts = 4 * 4 * 64 * w / MIB  # recorded input, output, grad_out, grad_input (float32)
    print(f"# MLP 4 x Linear({w}, {w}): float64 copy of the model {8 * n / MIB:.0f} MiB; of the watched "
          f"Linear + its input {module64:.1f} MiB; its recorded activations {acts:.1f} MiB")
    print("# peak RSS (VmHWM) of a fresh process, MiB above its RSS after building the model and batch")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--width", str(w)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()
        rows[mode] = (float(out[-2]), float(out[-1]))
    train = rows["train"][0]
    record = rows["record"][0]
    labels = {"train": "training step", "record": "step recorded for local", "whole": "step + whole-model check",
              "local": "recorded step + local check"}
    print(f"{'':30} {'peak':>8} {'adds':>8} {'/ model f64':>12} {'/ module f64 + acts':>20} {'s/check':>8}")
    for mode, (peak, seconds) in rows.items():
        base = record if mode == "local" else train
        extra = peak - base
        local_ratio = f"{extra / (module64 + acts):20.2f}" if mode == "local" else f"{'':20}"
        print(f"{labels[mode]:30} {peak:8.1f} {extra:8.1f} {extra / (8 * n / MIB):12.2f} {local_ratio} "
              f"{seconds:8.2f}")
    print("# 'adds': peak - peak of the training step (for the local check: of the recorded step); the recording "
          f"itself adds {record - train:.1f} MiB over the plain step")


if __name__ == "__main__":
    main()

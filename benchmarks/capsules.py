"""(g) Capsules (issue 23): their size and write time, and the memory a failure capsule takes.

Table 1, the examples: each example in ``examples/`` trained a few steps with its planted bug
(the capsules written next to its logs): per capsule, its file size and the seconds to build
and write it (``_CapsuleWriter.sizes``: cloning the tensors, ``torch.save`` to a temporary
file, the rename).

Table 2, a large model: an MLP of 16 x (Linear(W, W), Tanh) with W = 4096 (1 GiB of float32
parameters, batch 4) whose third Linear is a custom ``autograd.Function`` with a planted
backward bug (the sign of its weight gradient), trained 2 steps with SGD under ``GradWatch``
(every step checked). The whole model's float64 copy is over ``max_shadow_bytes``, so the
check is the module-local float64 check of that Linear (a suspect), which fails and writes
its capsule: the module's parameters, recorded input, ``grad_out``, gradients and replay
state. Each row runs in a fresh process (peak RSS, VmHWM, reset after building the model and
after a warm-up on a tiny model of the same kind, MALLOC_MMAP_THRESHOLD_=65536 so freed
tensors leave the resident set): training without gradwatch; with gradwatch and the default
capsule caps (32 MiB per capsule: the Linear's record does not fit and is left out, the
capsule says so); and with ``max_bytes`` raised to 1 GiB (the whole record). "adds" is the
peak above training without gradwatch; a second float64 copy of the model would be
2 x its float32 size (2 GiB for W=4096).

Run:  python benchmarks/capsules.py
      python benchmarks/capsules.py --width 2048     (quicker: 256 MiB of parameters)
      python benchmarks/capsules.py --no-examples
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from _common import add_common_args, header

MIB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS, ROWS, BUGGY = 16, 4, 4  # the buggy Linear is model[4] (the third Linear)


# --------------------------------------------------------------------------- table 1: the examples
def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _writers(tmp: str) -> dict[str, object]:
    """Run each example briefly with its planted bug; the capsule writer of each."""
    runs = {
        "train_planted_bug": lambda m: m.main(["--steps", "1", "--every", "1", "--logdir", os.path.join(tmp, "a")]),
        "custom_op_kernel": lambda m: m.main(["--steps", "1", "--every", "1", "--logdir", os.path.join(tmp, "b")])[1],
        "lightning_custom_layer": lambda m: m.main(["--steps", "1", "--every", "1", "--root", os.path.join(tmp, "c")]),
        "hf_trainer": lambda m: m.main(["--steps", "1", "--every", "1", "--output", os.path.join(tmp, "d")]),
        "debug_a_failure": lambda m: m.main(["--workdir", os.path.join(tmp, "e"), "--steps", "1"])["watch"],
    }
    out = {}
    for name, run in runs.items():
        sink = io.StringIO()
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = run(_example(name))._watch.capsules
        except ImportError as err:  # Lightning or transformers not installed
            out[name] = f"not run ({err})"
    return out


def _examples_table(args) -> None:
    print("\n# examples/: each capsule written by the example's first failing check")
    print(f"{'example':24} {'capsule':40} {'KiB':>9} {'ms to write':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, writer in _writers(tmp).items():
            if isinstance(writer, str):
                print(f"{name:24} {writer}")
                continue
            if not writer.sizes:
                print(f"{name:24} {'(none: no log directory)':40}")
            for key, (size, seconds) in writer.sizes.items():
                print(f"{name:24} {os.path.basename(writer.written[key]):40} {size / 1024:9.1f} {1000 * seconds:12.1f}")


# --------------------------------------------------------------------------- table 2: a large model
class _WrongSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        return grad @ weight, -(grad2.t() @ x.reshape(-1, x.shape[-1])), grad2.sum(0)  # BUG: -grad_w


class BuggyLinear(nn.Linear):
    def forward(self, x):
        return _WrongSign.apply(x, self.weight, self.bias)


def _model(width: int) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    layers = []
    for i in range(LAYERS):
        layers += [BuggyLinear(width, width) if 2 * i == BUGGY else nn.Linear(width, width), nn.Tanh()]
    g = torch.Generator().manual_seed(1)
    return nn.Sequential(*layers), (torch.randn(ROWS, width, generator=g), torch.randn(ROWS, width, generator=g))


def _loss(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")) / MIB


def _train(model, batch, watch, steps: int = 2) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if watch is None:
            _loss(model, batch).backward()
        else:
            with watch.step(batch):
                _loss(model, batch).backward()
        opt.step()
    return time.perf_counter() - started


def _watch(model, directory: str, max_bytes: int | None):
    import gradwatch

    watch = gradwatch.GradWatch(model, _loss, every_n_steps=1, max_overhead=None, seed=0, capsules=directory,
                                on_failure=lambda report: None)
    if max_bytes is not None:
        watch._watch.capsules.max_bytes = watch._watch.capsules.max_total_bytes = max_bytes
    return watch


def child(mode: str, width: int) -> None:
    """One row: ``plain``, ``default`` (caps as shipped) or ``raised`` (max_bytes 1 GiB)."""
    max_bytes = None if mode == "default" else 2**30
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, small_batch = _model(32)  # warm-up: code and allocator arenas loaded once per process
        _train(small, small_batch, None if mode == "plain" else _watch(small, os.path.join(tmp, "warm"), max_bytes))
        del small, small_batch
        model, batch = _model(width)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _vm("VmRSS")
        watch = None if mode == "plain" else _watch(model, os.path.join(tmp, "caps"), max_bytes)
        seconds = _train(model, batch, watch)
        peak = _vm("VmHWM") - before
        if watch is None:
            print(f"RESULT {peak:.1f} {seconds:.1f} - - - -")
            return
        writer = watch._watch.capsules
        report = watch.reports[0][1]
        key = f"{BUGGY}"
        size, write = writer.sizes.get(key, (0, float("nan")))
        from gradwatch.capsule import load_capsule

        missing = len(load_capsule(writer.written[key]).missing) if key in writer.written else -1
        failing = ",".join(t.name for t in report.failures) or "-"
        print(f"RESULT {peak:.1f} {seconds:.1f} {size / MIB:.1f} {write:.2f} {missing} {failing}")


def _large_table(args) -> None:
    n = LAYERS * (args.width**2 + args.width)
    copy64 = 8 * n / MIB
    module64 = 8 * (args.width**2 + args.width) / MIB
    print(f"\n# MLP {LAYERS} x (Linear({args.width}, {args.width}), Tanh), batch {ROWS}: {n / 1e6:.0f}M parameters, "
          f"{4 * n / MIB:.0f} MiB float32; model's float64 copy {copy64:.0f} MiB, the buggy Linear's {module64:.0f} MiB")
    print("# 2 SGD steps, each checked; peak RSS of a fresh process above its RSS after building the model (MiB)")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    rows = {}
    for mode in ("plain", "default", "raised"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--width", str(args.width),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows[mode] = next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1:]
    plain = float(rows["plain"][0])
    labels = {"plain": "training, no gradwatch", "default": "gradwatch, default caps (32 MiB)",
              "raised": "gradwatch, max_bytes 1 GiB"}
    print(f"{'':34} {'peak':>8} {'adds':>8} {'adds / model f64':>17} {'s (2 steps)':>12} {'capsule MiB':>12} "
          f"{'s to write':>11} {'left out':>9}  failing")
    for mode, (peak, seconds, size, write, missing, failing) in rows.items():
        adds = float(peak) - plain
        print(f"{labels[mode]:34} {float(peak):8.1f} {adds:8.1f} {adds / copy64:17.2f} {float(seconds):12.1f} "
              f"{size:>12} {write:>11} {missing:>9}  {failing}")
    print("# 'left out': lines in Capsule.missing (the record over the cap); a second float64 copy of the model "
          f"would add {copy64:.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--width", type=int, default=4096, help="width W of the large MLP (default 4096: 1 GiB)")
    parser.add_argument("--no-examples", action="store_true", help="skip table 1")
    parser.add_argument("--no-large", action="store_true", help="skip table 2")
    parser.add_argument("--child", choices=["plain", "default", "raised"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        return child(args.child, args.width)
    header(args)
    if not args.no_examples:
        _examples_table(args)
    if not args.no_large:
        _large_table(args)


if __name__ == "__main__":
    main()

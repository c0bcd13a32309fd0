"""(d) Peak memory of a training step with and without a gradwatch check.

The model is an MLP large enough for its parameters to dominate (4 x Linear(2048, 2048),
16.8M parameters, 64 MiB in float32). A float64 check holds one float64 copy of the
parameters (the shadow, 2x the float32 bytes) and, transiently, about one float64 tensor
of the size of the tensor being probed: the float64 reference gradient is never held
whole (each tensor's is reduced to what the probes need as the backward produces it),
points are made in place on the shadow and undone by copying the parameter back, tensors
above 2^18 elements are drawn, moved and summed a chunk at a time (their directions drawn
again at every use), a tensor over 1/4 of the shadow gets its reference gradient in a
backward of its own without its copy (a module-local check of one Linear), and the two
native replays of the precision test run without the shadow. The target (issue 14) is a peak of
at most 1.5x the float64 copy; with 4 equal tensors one tensor is 0.25x of it, so this
model is the hard case (shadow + one tensor + the float64 activations and allocator slack).

A second table: a model of 1 GiB of float32 parameters (16 x Linear(4096, 4096), 268M
parameters in 32 tensors, batch 4), whose float64 copy is 2 GiB: the peak added memory of a
default whole-model check, as a multiple of the float64 copy, and the seconds per check.
Its column "module-local check" is the peak added memory of a module-local float64 check
of one Linear (``2``, 1/16 of the model) recorded during the step, and that as a multiple
of the module's float64 copy plus its activations.

The module-local rows (both tables): the training step recorded for a module-local check
of the second Linear (``gradwatch._recording._Recording``: it keeps the module's input, output,
``grad_out`` and ``grad_input``, its activations), then that check (float64). "adds" is its
peak above the recorded step; the target (issue 14) is at most 1.5x the module's float64
copy (its parameters and recorded input) plus its recorded activations.

CPU: each measurement runs in a fresh subprocess and reads its peak resident set size
(VmHWM in /proc/self/status), so allocations of the other measurement cannot hide in it;
the subprocess runs with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed tensor
memory to the system at once and the resident size follows the live tensors. It first runs
the same check on a tiny model of the same kind, builds the model, then resets VmHWM
(/proc/self/clear_refs): neither the code pages and allocator arenas loaded once per process
(about 120 MiB here, the "held after" of a cold process) nor the temporaries of building the
model are counted as memory of the check. Every check is a float64 check
(``precision="float64"``: the 1 GiB model's float64 copy is above the default
``max_shadow_bytes``, where ``"auto"`` would evaluate natively). "held after" is
the resident size after the check minus before it.
CUDA: torch.cuda.max_memory_allocated() around the training step, then around the check.
Rows: the default check (kinks recorded, so sequential evaluation), the adapters' smallest
budgeted check (the joint probe alone at +-h, no kink resampling) and kinks=False (batched
evaluation, which stacks the 4 perturbed copies of the probed tensor, plus the unperturbed
one on the first call: not bounded by the target).

Run:  python benchmarks/memory.py
      python benchmarks/memory.py --device cuda
      python benchmarks/memory.py --width 512 --no-big     (quick: 4 x Linear(512, 512), no 1 GiB row)
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
from _common import ManySmall, add_common_args, header
from gradwatch._recording import _Recording
from gradwatch.local import _local_reports

MIB = 2**20


def _model_and_batch(device: str, width: int = 2048, layers: int = 4, rows: int = 64):
    torch.manual_seed(0)
    model = nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh()))).to(device)
    batch = (torch.randn(rows, width, device=device), torch.randn(rows, width, device=device))
    return model, batch


#: The large model: 16 x Linear(4096, 4096), 1 GiB of float32 parameters, batch 4.
BIG = {"width": 4096, "layers": 16, "rows": 4}


def loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _classification_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


class _Pooled(nn.Module):
    """One large embedding, mean-pooled over the tokens, and a 10-way head."""

    def __init__(self, rows: int = 32768, dim: int = 256) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(rows, dim), nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1))


def _gelu_mlp(width: int = 1536, layers: int = 6) -> nn.Module:
    return nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())), nn.Linear(width, 10))


#: The three layouts of issue 24 (batch 64, cross-entropy on 10 classes): name -> (description, builder of
#: the model at full and at warm-up size, input maker).
LAYOUTS = {
    "mid": ("many mid-size tensors: 6 x Linear(1536, 1536) + GELU, 10-way head, batch 64 x 1536",
            lambda tiny: _gelu_mlp(32 if tiny else 1536), lambda g, tiny: torch.randn(64, 32 if tiny else 1536, generator=g)),
    "embedding": ("one huge embedding: Embedding(32768, 256), mean-pooled, 10-way head, batch 64 x 16 tokens",
                  lambda tiny: _Pooled(64 if tiny else 32768, 8 if tiny else 256),
                  lambda g, tiny: torch.randint(0, 64 if tiny else 32768, (64, 16), generator=g)),
    "many": ("many small tensors behind a wide trunk: 606 tensors (Linear(384, 2048), Linear(2048, 256), "
             "150 x [Linear(256, 16), tanh, Linear(16, 256)], head), batch 64 x 384",
             lambda tiny: ManySmall(2 if tiny else 150, 32 if tiny else 2048),
             lambda g, tiny: torch.randn(64, 384, generator=g)),
}


def _layout(name: str, device: str, tiny: bool = False):
    """The model and batch of layout ``name`` (``tiny``: the warm-up model of the same kind)."""
    _, build, inputs = LAYOUTS[name]
    torch.manual_seed(0)
    model = build(tiny).to(device)
    g = torch.Generator().manual_seed(0)
    return model, (inputs(g, tiny).to(device), torch.randint(0, 10, (64,), generator=g).to(device))


def _vm(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":")) / MIB


CHECKS = {
    "default (sequential)": {},
    "smallest budgeted": {"richardson": False, "kink_resamples": 0, "coordinates": 0, "directions": 0},
    "kinks=False (batched)": {"kinks": False},
}


#: Modes of a child process besides CHECKS: the plain step, the step recorded for a
#: module-local check of the second Linear, and that check.
LOCAL = ("record", "local")
#: Modes of the layouts table besides "train" and the default check: the check as a new user calls it
#: after training (``grads="autograd"``: the check takes the gradient itself), and the forward of the
#: model in float64 keeping its graph (the float64 activations of one forward and backward).
AUTOGRAD, FLOAT64_STEP = "default, grads='autograd'", "float64 step"


def _module_sizes(width: int, rows: int) -> tuple[float, float]:
    """MiB of the watched Linear's float64 copy (parameters and recorded input) and of its
    recorded activations (input, output, grad_out, grad_input in float32)."""
    return 8 * (width * width + width + rows * width) / MIB, 4 * 4 * rows * width / MIB


def _run(mode: str, model: nn.Module, batch, loss_fn=loss_fn) -> tuple[str, float, float]:
    """One training step (recorded for mode "record"/"local") and the check of ``mode``;
    returns the check's precision/evaluation, its seconds, and the RSS after the step."""
    recording = _Recording({"2": model[2]}, model=model) if mode in LOCAL else None
    if mode == FLOAT64_STEP:  # the float64 forward only: the activations it saves for a backward
        loss = loss_fn(model, batch)
        return "-", float("nan"), _vm("VmRSS") + 0 * float(loss)
    if recording is None:
        loss_fn(model, batch).backward()
    else:
        with recording:
            loss_fn(model, batch).backward()
    trained = _vm("VmRSS")
    if mode in ("train", "record", FLOAT64_STEP):
        return "-", float("nan"), trained
    started = time.perf_counter()
    if mode == AUTOGRAD:
        model.zero_grad(set_to_none=True)
        report = gradwatch.check(model, loss_fn, batch, seed=0, precision="float64")
    elif mode == "local":
        (report,), _ = _local_reports(recording, 0, gradwatch.ProbeOptions(precision="float64"))
    else:
        report = gradwatch.check(model, loss_fn, batch, grads="existing", seed=0, precision="float64", **CHECKS[mode])
    return f"{report.precision}/{report.evaluation}", time.perf_counter() - started, trained


def _warm_up(mode: str, device: str) -> None:
    """Run the check once on a tiny model of the same kind (the peak RSS is reset after):
    code pages and arenas loaded once per process are not memory of the check."""
    model, batch = _model_and_batch(device, 32)
    _run(mode, model, batch)
    del model, batch


def _reset_peak() -> None:
    """Reset VmHWM to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(mode: str, device: str, width: int, layers: int, rows: int, layout: str | None = None) -> None:
    if layout is None:
        _warm_up(mode, device)
        model, batch = _model_and_batch(device, width, layers, rows)
        loss = loss_fn
    else:
        _run(mode, *_layout(layout, device, tiny=True), _classification_loss)
        model, batch = _layout(layout, device)
        loss = _classification_loss
        if mode == FLOAT64_STEP:
            model, batch = model.double(), (batch[0].double() if batch[0].is_floating_point() else batch[0], batch[1])
    _reset_peak()  # not the temporaries of building the model either
    before = _vm("VmRSS")
    evaluation, seconds, trained = _run(mode, model, batch, loss)
    print(f"{_vm('VmHWM') - before:.1f} {_vm('VmRSS') - trained:.1f} {seconds:.1f} {evaluation}")


def _measure(args, mode: str, width: int = 0, layers: int = 0, rows: int = 0,
             layout: str | None = None, glibc_default: bool = False) -> tuple[float, float, float, str]:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, __file__, "--child", mode, "--device", args.device, "--threads", str(args.threads),
           "--width", str(width), "--layers", str(layers), "--rows", str(rows)]
    cmd += ["--layout", layout] if layout is not None else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.split()
    return float(out[-4]), float(out[-3]), float(out[-2]), out[-1]


def _local_row(args, width: int, layers: int, rows: int) -> tuple[float, float, float]:
    """Peak added memory of the module-local check of the second Linear (above the recorded
    step), that as a multiple of the module's float64 copy plus activations, and its seconds."""
    record = _measure(args, "record", width, layers, rows)[0]
    peak, _, seconds, _ = _measure(args, "local", width, layers, rows)
    module64, acts = _module_sizes(width, rows)
    return peak - record, (peak - record) / (module64 + acts), seconds


def _big(args) -> None:
    """The 1 GiB row: default whole-model check and a module-local check of one Linear."""
    n = BIG["layers"] * (BIG["width"] ** 2 + BIG["width"])
    copy64 = 8 * n / MIB
    print(f"\n# MLP {BIG['layers']} x Linear({BIG['width']}, {BIG['width']}), batch {BIG['rows']}: {n / 1e6:.0f}M "
          f"parameters, {4 * n / MIB:.0f} MiB float32, float64 copy {copy64:.0f} MiB")
    train = _measure(args, "train", **BIG)[0]
    peak, _, seconds, evaluation = _measure(args, "default (sequential)", **BIG)
    extra = peak - train
    local, ratio, local_seconds = _local_row(args, **BIG)
    print(f"{'':34} {'check adds':>11} {'/ float64 copy':>15} {'s / check':>10}")
    print(f"{'whole-model check (default)':34} {extra:11.1f} {extra / copy64:15.2f} {seconds:10.1f}")
    print(f"{'module-local check of one Linear':34} {local:11.1f} {ratio:15.2f} {local_seconds:10.1f}"
          "   (/ the module's float64 copy + activations)")


def _layouts(args) -> None:
    """The table of issue 24: for each layout the training step's own peak, what a default float64
    check adds above it, and that as a multiple of the float64 copy of the parameters."""
    print("\n# issue 24 layouts: default whole-model check (precision='float64'), peak RSS of a fresh process, MiB")
    print(f"{'layout':10} {'malloc':9} {'check':26} {'tensors':>7} {'f64 copy':>9} {'f64 acts':>9} {'step peak':>10} "
          f"{'check adds':>11} {'/ f64 copy':>11} {'/ (copy+acts)':>14} {'held after':>11} {'s/check':>8}")
    for name in args.layouts:
        model, _ = _layout(name, "cpu")
        tensors = len(list(model.parameters()))
        copy64 = 8 * sum(p.numel() for p in model.parameters()) / MIB
        del model
        for glibc in (False, True):
            train = _measure(args, "train", layout=name, glibc_default=glibc)[0]
            # the float64 activations: the peak of a float64 forward that keeps its graph
            acts = _measure(args, FLOAT64_STEP, layout=name, glibc_default=glibc)[0]
            for mode in ("default (sequential)", AUTOGRAD):
                peak, held, seconds, _ = _measure(args, mode, layout=name, glibc_default=glibc)
                extra = peak - train
                label = "default, grads='existing'" if mode != AUTOGRAD else mode
                print(f"{name:10} {'default' if glibc else 'mmap 64K':9} {label:26} {tensors:7d} {copy64:9.1f} "
                      f"{acts:9.1f} {train:10.1f} {extra:11.1f} {extra / copy64:11.2f} {extra / (copy64 + acts):14.2f} "
                      f"{held:11.1f} {seconds:8.1f}")
    for name in args.layouts:
        print(f"# {name}: {LAYOUTS[name][0]}")
    print("# malloc: 'mmap 64K' = MALLOC_MMAP_THRESHOLD_=65536 (the resident size follows the live tensors), "
          "'default' = glibc as a user runs it (dynamic mmap threshold: freed heap memory stays resident)")
    print("# f64 acts: peak of a float64 forward of the same model that keeps its graph (the activations a "
          "backward needs); "
          "grads='autograd': the check after a training step as a new user calls it (it takes the gradient itself)")
    print("# target (issue 24): check adds <= 1.5 x the float64 copy (plus the float64 activations of one forward "
          "and backward where those dominate)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--width", type=int, default=2048, help="width of the 4 Linear layers (default 2048)")
    parser.add_argument("--no-big", action="store_true", help="skip the 1 GiB model (16 x Linear(4096, 4096))")
    parser.add_argument("--child", choices=["train", *CHECKS, *LOCAL, AUTOGRAD, FLOAT64_STEP], help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--layout", choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS),
                        help="issue 24 layouts to measure (default: all three; none: skip)")
    parser.add_argument("--only-layouts", action="store_true", help="print only the issue 24 layouts table")
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        return child(args.child, args.device, args.width, args.layers, args.rows, args.layout)
    header(args)
    if args.only_layouts:
        return _layouts(args)
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
            report = gradwatch.check(model, loss_fn, batch, grads="existing", seed=0, precision="float64", **kwargs)
            peak = (torch.cuda.max_memory_allocated() - base) / MIB
            rows[mode] = (peak, (torch.cuda.memory_allocated() - before) / MIB, report.evaluation)
    else:
        print("# peak RSS (VmHWM) of a fresh process, MiB above its RSS after building the model and batch")
        print("# (after the same check on a tiny model and a reset of VmHWM: code loaded once per process not counted)")
        for mode in ("train", *CHECKS):
            peak, held, _, evaluation = _measure(args, mode, args.width, 4, 64)
            rows[mode] = (peak, held, evaluation)
    train = rows["train"][0]
    print(f"{'':40} {'peak':>8} {'check adds':>11} {'/ float64 copy':>15} {'held after':>11}  evaluation")
    for mode, (peak, held, evaluation) in rows.items():
        label = "training step" if mode == "train" else f"step + check {mode}"
        extra = peak - train
        print(f"{label:40} {peak:8.1f} {extra:11.1f} {extra / copy64:15.2f} {held:11.1f}  {evaluation}")
    print("# 'check adds' = peak with the check - peak of the training step alone; 'held after' = what the check "
          "left allocated (the shadow is freed)")
    if not args.device.startswith("cuda"):
        local, ratio, seconds = _local_row(args, args.width, 4, 64)
        module64, acts = _module_sizes(args.width, 64)
        print(f"module-local check of one Linear: adds {local:.1f} MiB above the recorded step = {ratio:.2f} x its "
              f"float64 copy + input ({module64:.1f} MiB) + recorded activations ({acts:.1f} MiB); {seconds:.1f} s")
    if args.layouts and not args.device.startswith("cuda"):
        _layouts(args)
    if not args.no_big and not args.device.startswith("cuda"):
        _big(args)


if __name__ == "__main__":
    main()

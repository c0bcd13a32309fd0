"""False-alarm and detection rates of gradwatch in every precision mode.

Run:  python benchmarks/calibration.py --seeds 20
      python benchmarks/calibration.py --device cuda --seeds 3 --modes auto bf16-autocast fp16-gradscaler

For each mode it checks the correct zoo (tests/zoo.py: ReLU+dropout MLP, Conv+BN+MaxPool,
Transformer, LSTM, a correct custom Function, clamp/abs/maximum, LayerNorm+GELU), the
planted-bug zoo and the sparse-bug zoo (one wrong row, one wrong column, 2% on 1/64 of a
64x64 weight) over the seeds, one check per model and seed, and prints:

* false alarms: checks of a correct model where any tensor failed;
* detected: planted-bug checks where every wrong tensor failed (and, in brackets, where
  exactly the wrong tensors failed);
* the worst error/tolerance ratio on a correct model (must stay < 1) and the smallest on
  a wrong tensor (must stay > 1).

Modes: ``float64``, ``native`` and ``auto`` evaluation of float32 gradients,
``bf16-autocast``: gradients computed under bfloat16 autocast (through
:class:`gradwatch.GradWatch`), evaluated with ``precision="auto"``, and
``fp16-gradscaler``: float16 autocast with a ``torch.amp.GradScaler`` (the PyTorch AMP
recipe, ``GradWatch(..., scaler=scaler)``; the LSTM is left out on CPU, where oneDNN has
no fp16 LSTM). ``--device cuda`` moves every zoo model and batch to the GPU first.

Bugs marked ``native=False`` in the zoo (a tensor whose gradients are 1e-6 of the model's)
are below what float32 central differences resolve and are left out of the native mode.
"""

from __future__ import annotations

import argparse
import logging
import math
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import gradwatch  # noqa: E402
from zoo import BUGS, CORRECT, SPARSE_BUGS  # noqa: E402

MODES = ("float64", "native", "auto", "bf16-autocast", "fp16-gradscaler")
_AUTOCAST = {"bf16-autocast": torch.bfloat16, "fp16-gradscaler": torch.float16}


def _to(case, device: str):
    """The case with its model and batch on ``device``."""
    if device != "cpu":
        case.model.to(device)
        case.batch = tuple(t.to(device) for t in case.batch)
    return case


def _report(mode: str, case, seed: int, device: str = "cpu") -> gradwatch.Report:
    if mode not in _AUTOCAST:
        return gradwatch.check(case.model, case.loss_fn, case.batch, seed=seed, precision=mode)
    device_type = torch.device(device).type
    scaler = torch.amp.GradScaler(device_type) if mode == "fp16-gradscaler" else None
    watch = gradwatch.GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=seed,
                                on_failure=lambda r: None, scaler=scaler)
    with watch.step(case.batch):
        with torch.autocast(device_type, dtype=_AUTOCAST[mode]):
            loss = case.loss_fn(case.model, case.batch)
        (loss if scaler is None else scaler.scale(loss)).backward()
    return watch.last_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # one log line per check otherwise
    print(f"# python benchmarks/calibration.py --seeds {args.seeds}" + (
        "" if args.modes == list(MODES) else " --modes " + " ".join(args.modes))
        + ("" if args.device == "cpu" else f" --device {args.device}"))
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device} ({where})")
    header = (f"| mode | evaluated in | false alarms (correct) | detected (planted bugs) | detected (sparse bugs) "
              f"| max err/tol, correct | min err/tol, wrong | s/check |")
    print(header)
    print("|" + "---|" * 8)
    for mode in args.modes:
        started, checks = time.perf_counter(), 0
        stats = {"correct": [0, 0], "bug": [0, 0, 0], "sparse": [0, 0, 0]}
        worst_ok, worst_bug, precisions = 0.0, math.inf, set()
        for zoo, cases in (("correct", CORRECT), ("bug", BUGS), ("sparse", SPARSE_BUGS)):
            for name, build in cases.items():
                if mode == "fp16-gradscaler" and name == "lstm" and args.device == "cpu":
                    continue  # oneDNN has no fp16 LSTM on CPU
                for seed in range(args.seeds):
                    case = _to(build(seed), args.device)
                    if mode == "native" and not case.native:  # below what float32 differences resolve
                        continue
                    report = _report(mode, case, seed, args.device)
                    checks += 1
                    precisions.add(report.precision)
                    failed = {t.name for t in report.failures}
                    row = stats[zoo]
                    row[1] += 1
                    if zoo == "correct":
                        row[0] += bool(failed)
                        ratios = [t.error_ratio for t in report.tensors.values() if not math.isnan(t.error_ratio)]
                        worst_ok = max([worst_ok, *ratios])
                    else:
                        row[0] += case.wrong <= failed
                        row[2] += case.wrong == failed
                        worst_bug = min([worst_bug, *(report.tensors[n].error_ratio for n in case.wrong)])
        seconds = (time.perf_counter() - started) / checks
        c, b, s = stats["correct"], stats["bug"], stats["sparse"]
        print(f"| {mode} | {'/'.join(sorted(precisions))} | {c[0]}/{c[1]} ({c[0] / c[1]:.1%}) "
              f"| {b[0]}/{b[1]} ({b[0] / b[1]:.1%}) [{b[2]} exact] | {s[0]}/{s[1]} ({s[0] / s[1]:.1%}) [{s[2]} exact] "
              f"| {worst_ok:.3g} | {worst_bug:.3g} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()

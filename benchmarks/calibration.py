"""False-alarm and detection rates of gradwatch in every precision mode.

Run:  python benchmarks/calibration.py --seeds 20

For each mode it checks the correct zoo (tests/zoo.py: ReLU+dropout MLP, Conv+BN+MaxPool,
Transformer, LSTM, a correct custom Function, clamp/abs/maximum, LayerNorm+GELU), the
planted-bug zoo and the sparse-bug zoo (one wrong row, one wrong column, 2% on 1/64 of a
64x64 weight) over the seeds, one check per model and seed, and prints:

* false alarms: checks of a correct model where any tensor failed;
* detected: planted-bug checks where every wrong tensor failed (and, in brackets, where
  exactly the wrong tensors failed);
* the worst error/tolerance ratio on a correct model (must stay < 1) and the smallest on
  a wrong tensor (must stay > 1).

Bugs marked ``native=False`` in the zoo (a tensor whose gradients are 1e-6 of the model's)
are below what float32 central differences resolve and are left out of the native mode.

Modes: ``float64``, ``native`` and ``auto`` evaluation of float32 gradients, and
``bf16-autocast``: gradients computed under CPU bfloat16 autocast (through
:class:`gradwatch.GradWatch`), evaluated with ``precision="auto"``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import gradwatch  # noqa: E402
from zoo import BUGS, CORRECT, SPARSE_BUGS  # noqa: E402

MODES = ("float64", "native", "auto", "bf16-autocast")


def _report(mode: str, case, seed: int) -> gradwatch.Report:
    if mode != "bf16-autocast":
        return gradwatch.check(case.model, case.loss_fn, case.batch, seed=seed, precision=mode)
    watch = gradwatch.GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=seed,
                                on_failure=lambda r: None, kinks=True)
    with watch.step(case.batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = case.loss_fn(case.model, case.batch)
        loss.backward()
    return watch.last_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    print(f"# python benchmarks/calibration.py --seeds {args.seeds}" + (
        "" if args.modes == list(MODES) else " --modes " + " ".join(args.modes)))
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    header = (f"| mode | evaluated in | false alarms (correct) | detected (planted bugs) | detected (sparse bugs) "
              f"| max err/tol, correct | min err/tol, wrong | s/check |")
    print(header)
    print("|" + "---|" * 8)
    for mode in args.modes:
        started, checks = time.perf_counter(), 0
        stats = {"correct": [0, 0], "bug": [0, 0, 0], "sparse": [0, 0, 0]}
        worst_ok, worst_bug, precisions = 0.0, math.inf, set()
        for zoo, cases in (("correct", CORRECT), ("bug", BUGS), ("sparse", SPARSE_BUGS)):
            for build in cases.values():
                for seed in range(args.seeds):
                    case = build(seed)
                    if mode == "native" and not case.native:  # below what float32 differences resolve
                        continue
                    report = _report(mode, case, seed)
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

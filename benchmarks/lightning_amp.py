"""False alarms and detection of GradWatchCallback under Lightning mixed precision, CPU.

Run:  python benchmarks/lightning_amp.py --seeds 10 --steps 2
Trains every zoo case with ``Trainer(precision=...)`` for ``--steps`` optimizer steps,
checking each step, in fp32, ``bf16-mixed`` and ``16-mixed`` (fp16 autocast with a real
GradScaler, through ``MixedPrecision("16-mixed", "cpu")``: Lightning maps
``precision="16-mixed"`` to bf16 on CPU), with ``accumulate_grad_batches`` 1 and 2.
Prints, per case, the checks judged right, the margin (correct models: largest
error/tolerance on any tensor, must stay < 1; planted bugs: smallest error/tolerance on
a wrong tensor, must stay > 1) and the largest ``precision_gap`` of a tensor.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.plugins import MixedPrecision  # noqa: E402

from gradwatch.lightning import GradWatchCallback  # noqa: E402
from lightning_zoo import ZooModule, loader, trainer_kwargs  # noqa: E402
from zoo import BUGS, CORRECT  # noqa: E402

MODES = {
    "fp32": {},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "16-mixed": {"plugins": lambda: [MixedPrecision("16-mixed", "cpu")]},
}
NO_FP16 = {"lstm"}  # oneDNN has no fp16 LSTM on CPU


def run(name: str, build, mode: str, accumulate: int, seed: int, steps: int) -> list:
    module = ZooModule(build(seed))
    callback = GradWatchCallback(every_n_steps=1, max_overhead=None, seed=seed, on_failure=lambda report: None)
    kwargs = {k: (v() if callable(v) else v) for k, v in MODES[mode].items()}
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(max_steps=steps, accumulate_grad_batches=accumulate,
                                                                **kwargs))
    trainer.fit(module, loader(module.case, batches=steps * accumulate, seed=seed))
    return [(r, module.wrong) for _, r in callback.reports]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    for name in ("pytorch_lightning", "lightning_fabric", "gradwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"# python benchmarks/lightning_amp.py --seeds {args.seeds} --steps {args.steps}"
          f"   (torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')})")
    print(f"{'mode':10} {'acc':>3} {'zoo':7} {'case':20} {'right':>7} {'margin':>9} {'max gap':>8}")
    started = time.perf_counter()
    for mode in MODES:
        for accumulate in (1, 2):
            for zoo, cases in (("correct", CORRECT), ("bug", BUGS)):
                for name, build in cases.items():
                    if mode == "16-mixed" and name in NO_FP16:
                        continue
                    right = total = 0
                    margin = math.inf if zoo == "bug" else 0.0
                    gap = math.nan
                    for seed in range(args.seeds):
                        for report, wrong in run(name, build, mode, accumulate, seed, args.steps):
                            total += 1
                            right += {t.name for t in report.failures} == wrong and report.reliable
                            ratios = {t.name: t.error_ratio for t in report.tensors.values()
                                      if not math.isnan(t.error_ratio)}
                            if zoo == "bug":
                                margin = min([margin] + [ratios[n] for n in wrong if n in ratios])
                            else:
                                margin = max([margin] + list(ratios.values()))
                            gaps = [t.precision_gap for t in report.tensors.values() if not math.isnan(t.precision_gap)]
                            if gaps:
                                gap = max(gaps) if math.isnan(gap) else max([gap] + gaps)
                    print(f"{mode:10} {accumulate:>3} {zoo:7} {name:20} {right:>3}/{total:<3} {margin:>9.3g} {'-' if math.isnan(gap) else f'{gap:.3g}':>8}",
                          flush=True)
    print(f"# {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()

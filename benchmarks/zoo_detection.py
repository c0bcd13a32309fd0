"""Detection and false-alarm rates of `gradwatch.check` on the test zoo.

Run:  python benchmarks/zoo_detection.py --seeds 20
Prints, per case, how many seeds were judged right and the error/tolerance margin:
for planted bugs the smallest ratio on a wrong tensor (must stay > 1), for correct
models the largest ratio on any tensor (must stay < 1).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import gradwatch  # noqa: E402
from zoo import BUGS, CORRECT, SPARSE_BUGS  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    seeds = range(args.seeds)
    print(f"# python benchmarks/zoo_detection.py --seeds {args.seeds}")
    print(f"{'zoo':8} {'case':22} {'right':>7} {'margin':>9} {'s/check':>8}")
    started = time.perf_counter()
    for zoo, cases in (("correct", CORRECT), ("bug", BUGS), ("sparse", SPARSE_BUGS)):
        for name, build in cases.items():
            right, margins, seconds = 0, [], 0.0
            for seed in seeds:
                case = build(seed)
                report = gradwatch.check(case.model, case.loss_fn, case.batch, seed=seed)
                seconds += report.seconds
                failed = {t.name for t in report.failures}
                right += failed == case.wrong
                if case.wrong:
                    margins.append(min(report.tensors[n].error_ratio for n in case.wrong))
                else:
                    margins += [t.error_ratio for t in report.tensors.values() if not math.isnan(t.error_ratio)]
            margin = max(margins) if zoo == "correct" else min(margins)
            print(f"{zoo:8} {name:22} {right:>3}/{len(seeds):<3} {margin:>9.3g} {seconds / len(seeds):>8.3f}")
    print(f"# total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()

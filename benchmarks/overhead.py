"""(a) Training overhead of gradwatch at default settings: interleaved A/B, median ratio.

For each model, PAIRS pairs of runs of STEPS training steps (Adam, the same initial
weights and batches): one without gradwatch, one with ``GradWatch(model, loss_fn)`` at
its defaults (every_n_steps=100, max_overhead=0.02, 4 coordinates + 1 direction per
tensor). Pairs alternate the order (AB, BA, ...) so that drifting machine load hits both
sides alike; each pair gives one ratio (time with / time without) and the median over
the pairs is reported, for wall time and for this process's CPU time (which other
processes on a shared machine disturb less). Target: median wall ratio <= 1.03.

Run:  python benchmarks/overhead.py              (CPU, about 1-2 minutes on an idle core)
      python benchmarks/overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradwatch
from _common import MODELS, add_common_args, batches, build, classification_loss, header, sync


def run(name: str, data: list, steps: int, device: str, watched: bool) -> tuple[float, float, list]:
    model = build(name, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gradwatch.GradWatch(model, classification_loss, seed=0) if watched else None
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        batch = data[i % len(data)]
        opt.zero_grad()
        if watch is None:
            classification_loss(model, batch).backward()
        else:
            with watch.step(batch):
                classification_loss(model, batch).backward()
        opt.step()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, (watch.reports if watch else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--models", nargs="+", default=["cnn", "transformer"], choices=list(MODELS))
    args = parser.parse_args(argv)
    header(args)
    print(f"# {args.steps} steps per run, {args.pairs} interleaved pairs; gradwatch at defaults "
          "(every_n_steps=100, max_overhead=0.02)")
    print(f"{'model':12} {'s/run off':>9} {'s/run on':>9} {'wall ratio':>10} {'[min, max]':>15} "
          f"{'cpu ratio':>9} {'checks':>6} {'probes/check':>12} {'check s':>8}")
    for name in args.models:
        data = batches(name, 8, args.device)
        run(name, data, 20, args.device, False), run(name, data, 20, args.device, True)  # warm-up
        walls, cpus, offs, ons, reports = [], [], [], [], []
        for pair in range(args.pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            result = {w: run(name, data, args.steps, args.device, w) for w in order}
            (w_off, c_off, _), (w_on, c_on, rep) = result[False], result[True]
            walls.append(w_on / w_off)
            cpus.append(c_on / c_off)
            offs.append(w_off)
            ons.append(w_on)
            reports = rep
        probes = [sum(len(t.probes) for t in r.tensors.values()) for _, r in reports]
        seconds = [r.seconds for _, r in reports]
        print(f"{name:12} {statistics.median(offs):9.3f} {statistics.median(ons):9.3f} "
              f"{statistics.median(walls):10.3f} [{min(walls):.3f}, {max(walls):.3f}] "
              f"{statistics.median(cpus):9.3f} {len(reports):6d} {str(probes):>12} "
              f"{', '.join(f'{s:.3f}' for s in seconds):>8}")
    print("# ratio = run time with gradwatch / without, median over pairs; checks, probes and check seconds "
          "are those of the last watched run")


if __name__ == "__main__":
    main()

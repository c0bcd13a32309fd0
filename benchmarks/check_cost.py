"""(b) Check cost: seconds per probe, gradwatch against the seed article's per-coordinate loop.

The seed article's loop: a float64 copy of the model; for each coordinate, set
``θ_i ± h`` in place, evaluate the loss, ``.item()`` it (one host synchronisation per
evaluation), restore. It takes 2 loss evaluations per probe. gradwatch takes 4 per probe
(``±h`` and ``±2h``, for the error bar) plus 2 per check (replay checks), records kinks,
and moves results to the host once per check. Each row: median over REPEATS of one check
with COORDINATES coordinates and DIRECTIONS directions per tensor on the gradient of the
same training step.

A second table (issue 24): the cost of a one-off ``gradwatch.check(model, loss_fn, batch)`` at
defaults (``grads="autograd"``, every option at its default) and of ``assert_gradients`` at
defaults, in training steps (forward, backward and ``zero_grad`` of the same model and batch,
median of 5), against the number of parameter tensors: a 2048-wide trunk and 11, 49 or 150
bottleneck blocks ``Linear(256, 16)``, tanh, ``Linear(16, 256)`` (50, 202 and 606 tensors; batch
64). ``per_tensor="all"`` (every tensor its own coordinates and directions, the cost before
issue 24) is timed up to ``--all-upto`` tensors.

Run:  python benchmarks/check_cost.py
      python benchmarks/check_cost.py --device cuda
      python benchmarks/check_cost.py --tensors-only     (only the second table)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import gradwatch
from _common import MODELS, ManySmall, add_common_args, batches, build, classification_loss, header, sync


#: The gradwatch variants timed: the default (kinks recorded, sequential), and without kink
#: recording sequential and batched ("auto" falls back to sequential where vmap fails).
MODES = {
    "default": {},
    "kinks=False sequential": {"kinks": False, "evaluation": "sequential"},
    "kinks=False batched": {"kinks": False, "evaluation": "auto"},
}


def seed_article_loop(model, batch, coords: list[tuple[str, int]], h: float, device: str) -> float:
    """Per-coordinate central differences in float64, one host transfer per loss; returns seconds."""
    sync(device)
    start = time.perf_counter()
    model64 = copy.deepcopy(model).double()
    x, y = batch
    batch64 = (x.double() if x.is_floating_point() else x, y)
    params = dict(model64.named_parameters())
    rng = torch.get_rng_state()
    with torch.no_grad():
        for name, i in coords:
            flat = params[name].view(-1)
            old = flat[i].item()
            flat[i] = old + h
            torch.set_rng_state(rng)
            plus = classification_loss(model64, batch64).item()
            flat[i] = old - h
            torch.set_rng_state(rng)
            minus = classification_loss(model64, batch64).item()
            flat[i] = old
            _ = (plus - minus) / (2 * h)
    sync(device)
    return time.perf_counter() - start


#: Bottleneck blocks of the models of the second table: 6 + 4 * blocks tensors (50, 202, 606).
BLOCKS = (11, 49, 150)


def _train_step_seconds(model, batch, device: str, repeats: int = 5) -> float:
    """Median seconds of one training step (forward, backward, zero_grad) of ``model`` on ``batch``."""
    times = []
    for _ in range(repeats + 1):  # the first warms up
        sync(device)
        start = time.perf_counter()
        classification_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def tensor_counts(args) -> None:
    """The cost of a one-off check at defaults against the number of parameter tensors (issue 24)."""
    print("\n# one-off check at defaults against the number of parameter tensors: 2048-wide trunk + bottleneck "
          "blocks [Linear(256, 16), tanh, Linear(16, 256)], batch 64 x 384")
    print(f"{'tensors':>7} {'params':>8} {'step ms':>8} {'call':44} {'s':>8} {'steps':>8} {'own probes':>10} "
          f"{'evaluation':>10}")
    warm = ManySmall(2, 32).to(args.device)  # imports and first-call costs are not the check's
    wbatch = (torch.randn(64, 384, device=args.device), torch.randint(0, 10, (64,), device=args.device))
    gradwatch.check(warm, classification_loss, wbatch, seed=0)
    for blocks in BLOCKS:
        torch.manual_seed(0)
        model = ManySmall(blocks).to(args.device)
        g = torch.Generator().manual_seed(0)
        batch = (torch.randn(64, 384, generator=g).to(args.device), torch.randint(0, 10, (64,), generator=g).to(args.device))
        tensors = len(list(model.parameters()))
        params = sum(p.numel() for p in model.parameters())
        step = _train_step_seconds(model, batch, args.device)
        calls = {
            "gradwatch.check(model, loss_fn, batch)": lambda: gradwatch.check(model, classification_loss, batch, seed=0),
            "gradwatch.assert_gradients(model, loss_fn, batch)":
                lambda: gradwatch.assert_gradients(model, classification_loss, batch),
        }
        if tensors <= args.all_upto:
            calls["check(..., per_tensor='all')  (before issue 24)"] = (
                lambda: gradwatch.check(model, classification_loss, batch, seed=0, per_tensor="all"))
        for label, call in calls.items():
            seconds, report = _timed(call)
            own = sum(1 for t in report.tensors.values() if t.probes)
            print(f"{tensors:7d} {params / 1e6:7.2f}M {1e3 * step:8.1f} {label:44} {seconds:8.2f} {seconds / step:8.0f} "
                  f"{own:10d} {report.evaluation:>10}  {'ok' if report.ok else 'FAIL'}")
    print("# steps = seconds of the call / seconds of one training step; own probes = tensors with probes of their "
          "own (the others are verified by the joint probe and the float64 reference's precision test)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--coordinates", type=int, default=2)
    parser.add_argument("--directions", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--tensors-only", action="store_true", help="only the table against the number of tensors")
    parser.add_argument("--all-upto", type=int, default=60,
                        help="time per_tensor='all' on models of at most this many tensors (default 60)")
    args = parser.parse_args(argv)
    header(args)
    if args.tensors_only:
        return tensor_counts(args)
    print(f"# per tensor: {args.coordinates} coordinates + {args.directions} directions; "
          f"median of {args.repeats} checks")
    print(f"{'model':12} {'method':46} {'probes':>6} {'evals':>6} {'s/check':>8} {'ms/probe':>9} {'ms/eval':>8} "
          f"{'vs seed loop':>12} {'fails':>5}")
    for name in args.models:
        model = build(name, args.device)
        batch = batches(name, 1, args.device)[0]
        torch.manual_seed(1)
        replay = gradwatch.capture(model)  # the dropout masks of this training step, for every check
        loss = classification_loss(model, batch)
        loss.backward()
        rows = []
        for label, kwargs in MODES.items():
            times, report = [], None
            for r in range(args.repeats + 1):  # the first call warms up
                report = gradwatch.check(model, classification_loss, batch, grads="existing", seed=r,
                                         replay=replay, train_loss=loss, localize=False,
                                         coordinates=args.coordinates, directions=args.directions, **kwargs)
                if r:
                    times.append(report.seconds)
            assert report.reliable, report.reason
            fails = len(report.failures)
            probes = sum(len(t.probes) for t in report.tensors.values())
            rows.append((f"gradwatch {label} -> {report.evaluation}", probes, 2 + 4 * probes, statistics.median(times),
                         fails))
            if report.evaluation_reason and kwargs.get("evaluation") == "auto":
                print(f"# {name}: {report.evaluation_reason}")
        coords = [(n, i) for n, p in model.named_parameters()
                  for i in range(min(p.numel(), args.coordinates + args.directions))]
        loop = statistics.median(
            seed_article_loop(model, batch, coords, 1e-6, args.device) for _ in range(args.repeats)
        )
        seed_per_probe = loop / len(coords)
        rows.append(("seed article loop (float64, .item())", len(coords), 2 * len(coords), loop, "-"))
        for method, probes, evals, seconds, fails in rows:
            print(f"{name:12} {method:46} {probes:6d} {evals:6d} {seconds:8.3f} {1e3 * seconds / probes:9.2f} "
                  f"{1e3 * seconds / evals:8.2f} {seconds / probes / seed_per_probe:12.2f} {fails:>5}")
    print("# vs seed loop = (seconds per probe) / (seed loop seconds per probe); below 1 is faster. "
          "localize=False, so a failing tensor costs no extra evaluations; with kinks=False probes that cross a "
          "ReLU/max-pool kink are judged and can fail ('fails': tensors failed, none are real bugs)")
    tensor_counts(args)


if __name__ == "__main__":
    main()

"""Time to detect: how soon `GradWatch(model, loss_fn)` at its defaults finds a planted bug.

Run:  python benchmarks/time_to_detect.py --seeds 5 --steps 600

Three own models (an MLP with ReLU, a CNN with BatchNorm, ReLU and max-pool, a
transformer with GELU and 29 tensors) train with AdamW in a plain loop under
``GradWatch(model, loss_fn, seed=seed)`` (2% overhead budget, every 100 steps at
least). A backward bug is planted in one tensor: its gradient is 2% too large in the
first, a middle or the last tensor (``first``/``middle``/``last``), or only on 1/8 of
the rows of a middle weight (``rows``). The bug sits in the backward code (a custom
``autograd.Function`` around the parameter inside the module's forward), so the
float64 reference carries it too. Printed per case: the steps of the first detecting
check over the seeds, its wall time since the start of training, in how many seeds
the right tensor alone failed and the located element lay in the bug's rows, and the
cost of one full ``gradwatch.check`` (every tensor, defaults) in training steps.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch.report import local_name

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from zoo import ScaledGrad  # noqa: E402  (the planted bug: identity forward, backward scaled)


def _plant(model: nn.Module, name: str, scale: torch.Tensor) -> None:
    """Route parameter ``name`` through :class:`zoo.ScaledGrad` for the duration of ``model``'s forward
    (also under ``torch.func.functional_call``, which swaps the attribute; and for tensors such
    as ``out_proj.weight`` that their parent module reads without calling the owner's forward)."""
    module_name, _, pname = name.rpartition(".")
    owner = model.get_submodule(module_name)
    forward = model.forward

    def planted(*args, **kwargs):
        orig = getattr(owner, pname)
        owner._parameters[pname] = ScaledGrad.apply(orig, scale)
        try:
            return forward(*args, **kwargs)
        finally:
            owner._parameters[pname] = orig

    model.forward = planted


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, activation="gelu",
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


MODELS = {"mlp": _mlp, "cnn": _cnn, "transformer": _Transformer}


def _batch(model: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if model == "mlp":
        x = torch.randn(64, 32, generator=gen)
    elif model == "cnn":
        x = torch.randn(32, 3, 16, 16, generator=gen)
    else:
        x = torch.randint(0, 50, (16, 12), generator=gen)
    return x, torch.randint(0, 10, (x.shape[0],), generator=gen)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _target(model: nn.Module, where: str) -> tuple[str, torch.Tensor, set[int] | None]:
    """The tensor the bug goes in, its gradient scale, and the rows it touches (None: all)."""
    names = [n for n, _ in model.named_parameters()]
    weights = [n for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    name = {"first": names[0], "middle": names[len(names) // 2], "last": names[-1],
            "rows": weights[len(weights) // 2]}[where]
    p = dict(model.named_parameters())[name]
    scale = torch.ones_like(p)
    rows = None
    if where == "rows":
        n = max(p.shape[0] // 8, 1)
        rows = set(range(n, 2 * n))
        scale[n : 2 * n] = 1.02
    else:
        scale.fill_(1.02)
    return name, scale, rows


def _run(model_name: str, where: str, seed: int, steps: int) -> dict:
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    name, scale, rows = _target(model, where)
    _plant(model, name, scale)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(100 + seed)
    watch = gradwatch.GradWatch(model, _loss, seed=seed, on_failure=lambda report: None)
    started = time.perf_counter()
    out = {"step": None, "wall": None, "tensor": False, "element": False, "checks": 0}
    for step in range(steps):
        batch = _batch(model_name, gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with watch.step(batch):
                opt.zero_grad()
                _loss(model, batch).backward()
        opt.step()
        if watch.reports and watch.reports[-1][0] == step:
            out["checks"] += 1
            report = watch.reports[-1][1]
            failed = [t for t in report.tensors.values() if t.verdict == "fail"]
            if failed:
                out["step"], out["wall"] = step, time.perf_counter() - started
                # the planted tensor, and no other: its whole-model name, and its module-local
                # name when the default module-local checks watch the module (ScaledGrad is a custom
                # Function, so the owner module is a suspect)
                module_name, _, pname = name.rpartition(".")
                whole = next((t for t in failed if t.name == name), None)
                out["tensor"] = whole is not None and {t.name for t in failed} <= {name, local_name(module_name, pname)}
                # the element: located by the whole-model check, or by the module-local one (a failure
                # that a module-local check of the same step covers is located there)
                local = next((t for t in failed if t.name == local_name(module_name, pname)), None)
                worst = next((t.worst for t in (whole, local) if t is not None and t.worst is not None
                              and t.worst.index is not None), None) if out["tensor"] else None
                out["element"] = bool(worst is not None and (rows is None or worst.index[0] in rows))
                break
    return out


#: The checks whose cost is measured: every one verifies every tensor.
_COSTS = {
    "defaults": {},
    "joint only": {"coordinates": 0, "directions": 0},
    "smallest": {"coordinates": 0, "directions": 0, "richardson": False, "kink_resamples": 0},
}


def _full_check_cost(model_name: str) -> tuple[dict[str, float], float, int]:
    """Seconds of one ``gradwatch.check`` per kind of check, of one training step, and the tensors."""
    torch.manual_seed(0)
    model = MODELS[model_name]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = _batch(model_name, gen)
    for _ in range(5):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(20):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / 20
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, options in _COSTS.items():
            try:
                out[kind] = statistics.median(gradwatch.check(model, _loss, batch, seed=s, **options).seconds
                                              for s in range(3))
            except ValueError:  # a gradwatch without joint probes (the "before" run)
                out[kind] = float("nan")
    return out, step_s, sum(1 for _ in model.parameters())


def _check_at_defaults(model_name: str, seeds: int) -> tuple[int, int, float]:
    """``gradwatch.check`` at its defaults on a 2% error on 1/8 of the rows of each weight in turn:
    (caught with the right tensor, runs, smallest err/tol of the joint probe)."""
    caught = runs = 0
    worst = float("inf")
    torch.manual_seed(0)
    weights = [n for n, p in MODELS[model_name]().named_parameters() if p.dim() >= 2]
    for name in weights:
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = MODELS[model_name]()
            p = dict(model.named_parameters())[name]
            scale = torch.ones_like(p)
            n = max(p.shape[0] // 8, 1)
            scale[n : 2 * n] = 1.02
            _plant(model, name, scale)
            batch = _batch(model_name, torch.Generator().manual_seed(100 + seed))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = gradwatch.check(model, _loss, batch, seed=seed)
            runs += 1
            caught += [t.name for t in report.failures] == [name]
            if getattr(report, "joint", ()):
                worst = min(worst, report.joint[0].error / report.joint[0].tolerance)
    return caught, runs, worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--bugs", default="first,middle,last,rows")
    parser.add_argument("--check-seeds", type=int, default=2,
                        help="seeds per weight for gradwatch.check at its defaults (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"# python benchmarks/time_to_detect.py --seeds {args.seeds} --steps {args.steps}   (torch {torch.__version__})")
    print(f"{'model':12} {'bug':7} {'tensors':>7} {'detected':>8} {'first detecting steps':28} {'wall s (median)':>15} "
          f"{'tensor ok':>9} {'element ok':>10}")
    for model_name in args.models.split(",") if args.seeds else ():
        for where in args.bugs.split(","):
            runs = [_run(model_name, where, seed, args.steps) for seed in range(args.seeds)]
            found = [r for r in runs if r["step"] is not None]
            steps = ",".join("-" if r["step"] is None else str(r["step"]) for r in runs)
            wall = f"{statistics.median(r['wall'] for r in found):.2f}" if found else "-"
            count = sum(1 for _ in MODELS[model_name]().parameters())
            print(f"{model_name:12} {where:7} {count:7d} {len(found):>4}/{len(runs):<3} {steps:28} {wall:>15} "
                  f"{sum(r['tensor'] for r in runs):>5}/{len(runs):<3} {sum(r['element'] for r in runs):>6}/{len(runs):<3}",
                  flush=True)
    print()
    print("cost of one check that verifies every tensor, in training steps (AdamW step, 1 thread)")
    print(f"{'model':12} {'tensors':>7} {'train step s':>12} " + " ".join(f"{k:>11}" for k in _COSTS))
    for model_name in args.models.split(","):
        costs, step_s, count = _full_check_cost(model_name)
        print(f"{model_name:12} {count:7d} {step_s:12.5f} " + " ".join(f"{costs[k] / step_s:11.1f}" for k in _COSTS),
              flush=True)
    if args.check_seeds:
        print()
        print(f"gradwatch.check at defaults, 2% error on 1/8 of the rows of each weight in turn, {args.check_seeds} seeds")
        print(f"{'model':12} {'caught':>8} {'min joint err/tol':>17}")
        for model_name in args.models.split(","):
            caught, runs, worst = _check_at_defaults(model_name, args.check_seeds)
            print(f"{model_name:12} {caught:>4}/{runs:<3} {worst:17.3g}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

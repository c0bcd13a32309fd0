"""Cost of kink recording: check time with and without it, and the memory it keeps.

Run:  python benchmarks/kink_overhead.py --repeats 7
Prints, per model, the median wall time of ``gradwatch.check`` with ``kinks=False``,
with kink recording but no resampling (``kink_resamples=0``), and at defaults
(recording + resampling), interleaved so that load changes hit all three alike; the
ratios to ``kinks=False``; and the bytes the reference pass keeps for margins
(branch codes, float32 switching inputs, winner indices) next to the float64 copy of
the parameters the check holds anyway, and what the same switching inputs take as
float64 activations.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import gradwatch  # noqa: E402
from gradwatch.kinks import _BranchRecorder  # noqa: E402
from gradwatch.replay import _cast_floats  # noqa: E402
from zoo import CORRECT, Case, classification_loss  # noqa: E402


def _wide_cnn(seed: int) -> Case:
    """A CNN with larger activations: 32x32 inputs, 16 channels, ReLU, max-pool, clamp."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.Hardtanh(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )
    g = torch.Generator().manual_seed(seed)
    batch = (torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
    return Case("wide_cnn", model, classification_loss, batch)


MODELS = {
    "mlp_relu_dropout": CORRECT["mlp_relu_dropout"],
    "cnn_bn_pool": CORRECT["cnn_bn_pool"],
    "transformer": CORRECT["transformer"],
    "clamp_abs_maximum": CORRECT["clamp_abs_maximum"],
    "wide_cnn": _wide_cnn,
}
SETTINGS = {"off": {"kinks": False}, "record": {"kink_resamples": 0}, "default": {}}


def _reference_bytes(case: Case) -> tuple[int, int]:
    """Bytes the reference pass of a check keeps for margins, and the bytes of the same
    switching inputs as float64 activations (what keeping the activations would cost)."""
    model = case.model
    names = {id(m): n for n, m in model.named_modules()}
    params = {n: p.detach().to(torch.float64) for n, p in model.named_parameters()}
    buffers = {n: b.to(torch.float64) if b.is_floating_point() else b.clone() for n, b in model.named_buffers()}
    recorder = _BranchRecorder(names)
    with torch.no_grad(), recorder:
        functional_call(model, {**params, **buffers}, (_cast_floats(case.batch, torch.float64)[0],))
    ref = recorder.take_reference()
    return ref.nbytes, sum(z.numel() * 8 for z in ref.z if z is not None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# python benchmarks/kink_overhead.py --repeats {args.repeats} --threads {args.threads}")
    print(f"# torch {torch.__version__}, CPU, {torch.get_num_threads()} thread(s); seconds are medians")
    print(
        f"{'model':18} {'off s':>8} {'record s':>9} {'default s':>10} {'record/off':>11} {'default/off':>12} "
        f"{'events':>7} {'resampled':>10} {'ref KiB':>8} {'z as f64 KiB':>13} {'params64 KiB':>13}"
    )
    for name, build in MODELS.items():
        case = build(0)
        times: dict[str, list[float]] = {k: [] for k in SETTINGS}
        report = None
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for label, kwargs in SETTINGS.items():
                started = time.perf_counter()
                r = gradwatch.check(case.model, case.loss_fn, case.batch, seed=0, **kwargs)
                times[label].append(time.perf_counter() - started)
                if label == "default":
                    report = r
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        params64 = sum(p.numel() * 8 for p in case.model.parameters())
        kept, as_float64 = _reference_bytes(case)
        print(
            f"{name:18} {med['off']:8.3f} {med['record']:9.3f} {med['default']:10.3f} "
            f"{med['record'] / med['off']:11.2f} {med['default'] / med['off']:12.2f} "
            f"{len(report.kink_events):7d} {report.kink_resamples:10d} "
            f"{kept / 1024:8.1f} {as_float64 / 1024:13.1f} {params64 / 1024:13.1f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""Kink crossings: every non-smooth op family is recorded, from modules and functions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch import check
from gradwatch.kinks import _BranchRecorder, _ProbeKinks
from zoo import CORRECT

C = 0.5  # kink location
D = 1e-7  # distance of the operating point from the kink, well inside ±h (h = 6e-6)


class Scalar(nn.Module):
    """One parameter ``w`` sitting ``D`` above the kink of ``fn``."""

    def __init__(self, fn, start: float = C + D) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([start]))
        self.fn = fn

    def forward(self, _):
        return self.fn(self.w).sum()


def _loss(model, batch):
    return model(batch)


CASES = {
    "relu_module": lambda w: nn.ReLU()(w - C),
    "relu_inplace": lambda w: nn.ReLU(inplace=True)(w - C),
    "relu_functional": lambda w: F.relu(w - C),
    "leaky_relu": lambda w: F.leaky_relu(w - C, 0.1),
    "relu6": lambda w: F.relu6(w + 6 - C),
    "hardtanh": lambda w: F.hardtanh(w - C + 1),
    "elu": lambda w: F.elu(w - C, alpha=0.5),
    "prelu": lambda w: F.prelu(w - C, torch.tensor([0.2])),
    "threshold": lambda w: F.threshold(w, C, 0.0),
    "clamp": lambda w: torch.clamp(w, min=C),
    "clamp_max": lambda w: w.clamp(max=C),
    "abs": lambda w: (w - C).abs(),
    "maximum": lambda w: torch.maximum(w, torch.tensor([C])),
    "minimum": lambda w: torch.minimum(w, torch.tensor([C])),
    "max_full": lambda w: torch.cat([w, torch.tensor([C])]).max(),
    "max_dim": lambda w: torch.stack([w, torch.tensor([C])]).max(dim=0).values,
    "max_pool1d_tie": lambda w: F.max_pool1d(torch.cat([w, torch.tensor([C])]).view(1, 1, 2), 2),
    "max_pool2d_tie": lambda w: F.max_pool2d(torch.cat([w, torch.full((3,), C)]).view(1, 1, 2, 2), 2),
    "adaptive_max_pool": lambda w: F.adaptive_max_pool1d(torch.cat([w, torch.tensor([C])]).view(1, 1, 2), 1),
    "argmax_index": lambda w: (x := torch.cat([w, torch.tensor([C]) * 2 - w.detach()]))[x.argmax()],
    "sort": lambda w: torch.sort(torch.cat([w, torch.tensor([C])]))[0][0] * 3,
    "topk": lambda w: torch.topk(torch.cat([w, torch.tensor([C])]), 1)[0],
    "where_comparison": lambda w: torch.where(w > C, 2 * w, 3 * w),
    "hardswish": lambda w: F.hardswish(w + 3 - C),
    "round_discontinuity": lambda w: torch.round(2 * (w - C) + 0.5) + w,
    "floor_discontinuity": lambda w: torch.floor(w - C) + w,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forced_crossing_is_recorded_as_a_kink(case: str) -> None:
    model = Scalar(CASES[case])
    report = check(model, _loss, None, seed=0, coordinates=1, directions=1)
    tc = report.tensors["w"]
    assert all(p.kink for p in tc.probes), str(report)
    assert tc.verdict == "kink" and report.ok


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_ops_away_from_the_kink_are_judged_normally(case: str) -> None:
    model = Scalar(CASES[case], start=C + 0.25)
    report = check(model, _loss, None, seed=0, coordinates=1, directions=1)
    tc = report.tensors["w"]
    assert not any(p.kink for p in tc.probes)
    assert tc.verdict == "pass", str(report)


def test_without_kink_recording_a_crossing_looks_like_a_bug() -> None:
    model = Scalar(CASES["clamp"])
    report = check(model, _loss, None, seed=0, coordinates=1, directions=0, kinks=False)
    assert report.tensors["w"].verdict == "fail"


def test_smooth_models_have_no_kinks() -> None:
    for seed in range(3):
        for name in ("layernorm_gelu", "lstm", "custom_function"):
            case = CORRECT[name](seed)
            report = check(case.model, case.loss_fn, case.batch, seed=seed)
            assert report.kink_fraction == 0.0, name


def test_recording_does_not_change_the_loss() -> None:
    case = CORRECT["cnn_bn_pool"](0)
    on = check(case.model, case.loss_fn, case.batch, seed=0)
    off = check(case.model, case.loss_fn, case.batch, seed=0, kinks=False)
    assert on.replay_loss == off.replay_loss


def _compare(rec: _BranchRecorder, ref, fn, *, margins: bool = True) -> _ProbeKinks:
    target = _ProbeKinks(ref, torch.device("cpu"))
    with rec.compare_into(target.next_pass(margins=margins)):
        fn()
    return target


def test_recorder_keeps_one_checksum_per_op_and_compares_exactly() -> None:
    x = torch.randn(1000, dtype=torch.float64)

    def run(v):
        return lambda: (F.relu(v), torch.clamp(v, -1, 1), v.abs(), F.max_pool1d(v.view(1, 1, -1), 2))

    rec = _BranchRecorder()
    with rec.compare_into(None):
        run(x)()
    ref = rec.take_reference()
    assert ref.names[:3] == ["relu", "clamp", "abs"] and ref.names[3].startswith("max_pool")
    assert all(s.dim() == 0 for s in ref.sums)
    y = x.clone()
    y[123] = -y[123]  # one element changes sign
    assert bool(_compare(rec, ref, run(y)).any_crossed())
    same = _compare(rec, ref, run(x))
    assert not bool(same.any_crossed()) and same.diverged is None
    assert bool(torch.isinf(same.margin).all())  # nothing moved
    other = _compare(rec, ref, lambda: F.relu(x))
    assert other.diverged == 1 and bool(other.any_crossed())  # a different op sequence is a crossing


def test_integer_comparisons_are_not_recorded() -> None:
    labels = torch.arange(10)
    rec = _BranchRecorder()
    with rec:
        labels > 3, labels.max(), torch.argmax(labels)
    assert rec.take_reference().names == []

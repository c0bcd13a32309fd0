"""Kink crossings: every non-smooth op family is recorded, from modules and functions."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
from gradwatch import GradWatch, KinkWarning, check
from gradwatch.kinks import _branch, _BranchRecorder, _ProbeKinks
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
    report = check(model, _loss, None, seed=0, coordinates=1, directions=1, joint=0)  # the probes of w alone
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
    report = check(model, _loss, None, seed=0, coordinates=1, directions=1, kinks=False)
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


def test_recorder_keeps_one_code_per_op_and_compares_exactly() -> None:
    x = torch.randn(1000, dtype=torch.float64)

    def run(v):
        return lambda: (F.relu(v), torch.clamp(v, -1, 1), v.abs(), F.max_pool1d(v.view(1, 1, -1), 2))

    rec = _BranchRecorder()
    with rec.compare_into(None):
        run(x)()
    ref = rec.take_reference()
    assert ref.names[:3] == ["relu", "clamp", "abs"] and ref.names[3].startswith("max_pool")
    assert [c.shape for c in ref.codes[:3]] == [x.shape] * 3
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


# ----------------------------------------------------------------- events, margins, modules
DISCONTINUOUS_CASES = {"round_discontinuity", "floor_discontinuity", "threshold"}  # threshold: value 0 != 0.5


def _crossed_events(report):
    return [e for e in report.kink_events if e.crossed]


@pytest.mark.parametrize("case", sorted(CASES))
def test_forced_crossing_has_an_event_with_margin_below_one(case: str) -> None:
    report = check(Scalar(CASES[case]), _loss, None, seed=0, coordinates=1, directions=0)
    crossed = _crossed_events(report)
    assert crossed, str(report)
    assert min(e.margin for e in crossed) < 1.0
    assert all(e.tensor == "w" and e.probe == 0 and e.near for e in crossed)
    kinds = {e.kind for e in crossed}
    assert kinds == ({"discontinuity"} if case in DISCONTINUOUS_CASES else {"kink"}), kinds


@pytest.mark.parametrize("case", sorted(CASES))
def test_far_from_the_kink_events_are_not_near(case: str) -> None:
    report = check(Scalar(CASES[case], start=C + 0.25), _loss, None, seed=0, coordinates=1, directions=0)
    assert not any(e.crossed or e.near for e in report.kink_events), report.kink_events
    assert report.kink_fraction == 0.0


class Encoder(nn.Module):
    """Three pre-activations equal to the bias (zero weight): 0.5, D and -0.5."""

    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        self.head = nn.Linear(3, 1)
        with torch.no_grad():
            self.enc[0].weight.zero_()
            self.enc[0].bias.copy_(torch.tensor(bias))
            self.head.weight.fill_(1.0)

    def forward(self, x):
        return self.head(self.enc(x)).sum()


def test_relu_crossing_in_a_named_submodule_names_module_op_and_margin() -> None:
    model = Encoder([0.5, D, -0.5])
    report = check(model, _loss, torch.ones(1, 2), seed=0, coordinates=3, directions=0)
    bias = report.tensors["enc.0.bias"]
    kinked = [p.index for p in bias.probes if p.kink]
    assert kinked == [(1,)] and bias.verdict == "pass", str(report)
    (event,) = [e for e in bias.kink_events if e.crossed]
    assert (event.tensor, event.module, event.op, event.kind) == ("enc.0.bias", "enc.1", "relu", "kink")
    assert bias.probes[event.probe].index == (1,)
    # z0 = D, the ±2h passes move it by 2h = 1.2e-5: margin D / 2h
    assert event.margin == pytest.approx(D / (2 * 6e-6), rel=1e-3)
    assert not event.at_kink
    assert report.kink_counts["enc.0.bias"] == 1 and report.kink_margin_min <= event.margin
    assert all(e.module == "enc.1" and e.op == "relu" for e in report.kink_events)


def test_relu_input_exactly_zero_is_at_kink() -> None:
    model = Encoder([0.5, 0.0, -0.5])
    report = check(model, _loss, torch.ones(1, 2), seed=0, coordinates=3, directions=0)
    (event,) = [e for e in report.tensors["enc.0.bias"].kink_events if e.crossed]
    assert event.at_kink and event.margin == 0.0 and event.module == "enc.1"
    assert [p.index for p in report.tensors["enc.0.bias"].probes if p.at_kink] == [(1,)]


class Wrapped(nn.Module):
    """``w`` through a named child module ``inner`` that applies ``fn``."""

    class Inner(nn.Module):
        def __init__(self, fn) -> None:
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    def __init__(self, fn, start: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(start))
        self.inner = self.Inner(fn) if not isinstance(fn, nn.Module) else fn

    def forward(self, _):
        return (self.inner(self.w) * torch.arange(1.0, 1.0 + self.w.numel()).view(self.w.shape)[..., :1]).sum()


@pytest.mark.parametrize(
    "fn, start, op",
    [
        (nn.MaxPool1d(2), [[[C + D, C, 0.0, 1.0]]], "max_pool2d_with_indices"),  # near-tie in the first window
        (nn.MaxPool2d(2), [[[[C + D, C], [0.0, 0.2]]]], "max_pool2d_with_indices"),
        (nn.AdaptiveMaxPool1d(1), [[[C + D, C]]], "adaptive_max_pool2d"),
        (lambda x: torch.clamp(x, min=C - 1.0, max=C), [C + D, 0.0], "clamp"),  # upper bound
        (lambda x: torch.clamp(x, min=C, max=C + 1.0), [C + D, C + 0.5], "clamp"),  # lower bound
        (lambda x: torch.maximum(x, torch.full_like(x, C)), [C + D, 2.0], "maximum"),
        (lambda x: x.max(dim=-1).values, [[C + D, C]], "max"),
        (lambda x: torch.topk(x, 1).values, [C + D, C, 0.0], "topk"),
        (lambda x: torch.sort(x).values * torch.tensor([1.0, 2.0, 3.0]), [C + D, C, 0.0], "sort"),
        (lambda x: x[x.argmax()], [C + D, C], "argmax"),
    ],
    ids=["max_pool1d", "max_pool2d", "adaptive_max_pool", "clamp_max", "clamp_min", "maximum", "max_dim", "topk",
         "sort", "argmax"],
)
def test_crossings_name_the_module_and_op(fn, start, op) -> None:
    model = Wrapped(fn, start)
    report = check(model, _loss, None, seed=0, coordinates=model.w.numel(), directions=0)
    (first,) = [p for p in report.tensors["w"].probes if not any(p.index)]  # the element D from the kink
    crossed = _crossed_events(report)
    assert first.kink and crossed, str(report)
    assert {(e.module, e.op) for e in crossed} == {("inner", op)}
    assert min(e.margin for e in crossed) < 1.0


def test_max_pool_exact_tie_is_at_kink() -> None:
    model = Wrapped(nn.MaxPool1d(2), [[[C, C, 0.0, 1.0]]])
    report = check(model, _loss, None, seed=0, coordinates=4, directions=0)
    at = [e for e in report.kink_events if e.at_kink]
    assert at and all(e.op == "max_pool2d_with_indices" and e.margin == 0.0 for e in at)
    assert {report.tensors["w"].probes[e.probe].index for e in at} <= {(0, 0, 0), (0, 0, 1)}


def test_functional_relu_in_a_plain_loss_function_has_no_module() -> None:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(-C)

    def loss_fn(m, batch):
        return F.relu(m(batch) - D).sum()  # outside any module

    report = check(model, loss_fn, torch.tensor([[C + 2 * D]]), seed=0, coordinates=1, directions=0)
    crossed = _crossed_events(report)
    assert crossed and all(e.module is None and e.op == "relu" and e.margin < 1 for e in crossed)


def test_module_attribution_uses_the_innermost_module() -> None:
    case = CORRECT["transformer"](0)  # TransformerEncoderLayer calls F.relu in its forward
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    assert {(e.module, e.op) for e in report.kink_events} == {("layer", "relu")}


def test_smooth_models_have_no_kink_events() -> None:
    for name in ("layernorm_gelu", "lstm", "custom_function"):  # GELU, tanh/sigmoid only
        case = CORRECT[name](0)
        report = check(case.model, case.loss_fn, case.batch, seed=0)
        assert report.kink_events == [] and report.kink_resamples == 0, name
        assert "gradwatch/kink_margin_min" not in report.metrics()


class StraightThroughRound(nn.Module):
    """Quantisation with a straight-through estimator: forward rounds, backward is identity."""

    def __init__(self, start: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(start))

    def forward(self, _):
        q = self.w + (torch.round(self.w) - self.w).detach()
        return (q * q).sum()


def test_round_straight_through_estimator_reports_a_discontinuity() -> None:
    report = check(StraightThroughRound([0.5 + D, 0.2]), _loss, None, seed=0, coordinates=2, directions=0)
    events = [e for e in report.kink_events if e.op == "round"]
    assert events and all(e.kind == "discontinuity" and e.module == "" for e in events)
    assert any(e.crossed and e.margin < 1 for e in events)


def test_comparison_feeding_where_is_a_kink_and_feeding_arithmetic_a_discontinuity() -> None:
    where = check(Scalar(lambda w: torch.where(w > C, w, 0.5 * w)), _loss, None, seed=0, coordinates=1, directions=0)
    mask = check(Scalar(lambda w: w * (w > C)), _loss, None, seed=0, coordinates=1, directions=0)
    assert {(e.op, e.kind) for e in _crossed_events(where)} == {("gt", "kink")}
    assert {(e.op, e.kind) for e in _crossed_events(mask)} == {("gt", "discontinuity")}


# ----------------------------------------------------------------- resampling
class MostlyNearKinks(nn.Module):
    """64 weights; 56 of them sit D above their ReLU's kink, 8 far from it."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.linspace(-1.0, 1.0, 64)
        self.far = torch.zeros(64, dtype=torch.bool)
        self.far[::8] = True
        self.kink = torch.where(self.far, w - 0.3, w - D)
        self.w = nn.Parameter(w)

    def forward(self, _):
        return (F.relu(self.w - self.kink) * torch.linspace(1.0, 2.0, 64)).sum()


def test_resampling_keeps_every_tensor_checked_when_most_coordinates_sit_near_kinks() -> None:
    unchecked = 0
    for seed in range(6):
        model = MostlyNearKinks()
        without = check(model, _loss, None, seed=seed, coordinates=4, directions=0, kink_resamples=0, joint=0)
        unchecked += without.tensors["w"].verdict == "kink"
        report = check(model, _loss, None, seed=seed, coordinates=4, directions=0, kink_resamples=40)
        tc = report.tensors["w"]
        assert tc.verdict == "pass", str(report)
        assert any(not p.kink for p in tc.probes)
        assert tc.resampled == sum(p.replacement for p in tc.probes) == report.kink_resamples
        assert sum(not p.kink for p in tc.probes) == 4  # every crossed coordinate was replaced
        indices = [p.index for p in tc.probes]
        assert len(set(indices)) == len(indices)  # replacements are fresh coordinates
        assert [p.index for p in tc.probes[:4]] == [p.index for p in without.tensors["w"].probes]
        again = check(model, _loss, None, seed=seed, coordinates=4, directions=0, kink_resamples=40)
        assert [p.index for p in again.tensors["w"].probes] == indices  # deterministic given the seed
    assert unchecked >= 2  # without resampling, some checks verify nothing


def test_resampling_budget_bounds_the_replacements() -> None:
    model = MostlyNearKinks()
    for budget in (1, 3):
        report = check(model, _loss, None, seed=0, coordinates=4, directions=0, kink_resamples=budget)
        assert report.tensors["w"].resampled <= budget
        assert len(report.tensors["w"].probes) == 4 + report.tensors["w"].resampled


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kink_resamples": -1}, r"`kink_resamples` must be a non-negative int, got -1"),
        ({"kink_resamples": 1.5}, r"`kink_resamples` must be a non-negative int, got 1.5"),
        ({"near_kink_margin": 0.0}, r"`near_kink_margin` must be a positive finite number, got 0.0"),
        ({"near_kink_margin": "10"}, r"`near_kink_margin` must be a positive finite number, got '10'"),
    ],
)
def test_kink_arguments_are_validated(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        check(Scalar(torch.relu), _loss, None, **kwargs)
    with pytest.raises(ValueError, match=match):  # the adapters take them in one ProbeOptions
        GradWatch(Scalar(torch.relu), _loss, options=gradwatch.ProbeOptions(**kwargs))


def test_near_kink_margin_sets_what_counts_as_near() -> None:
    model = Encoder([0.5, 3e-5, -0.5])  # margin 3e-5 / 2h = 2.5: near, not crossed
    tight = check(model, _loss, torch.ones(1, 2), seed=0, coordinates=3, directions=0, near_kink_margin=2.0)
    loose = check(model, _loss, torch.ones(1, 2), seed=0, coordinates=3, directions=0, near_kink_margin=3.0)
    assert not any(e.near for e in tight.kink_events) and tight.kink_fraction == 0.0
    near = [e for e in loose.tensors["enc.0.bias"].kink_events if e.near]
    assert [(e.module, e.crossed) for e in near] == [("enc.1", False)]
    assert near[0].margin == pytest.approx(2.5, rel=1e-3)


# ----------------------------------------------------------------- memory
def test_reference_keeps_a_float32_switching_input_and_a_byte_code_and_compares_into_scalars() -> None:
    x = torch.randn(10_000, dtype=torch.float64)
    rec = _BranchRecorder()
    with rec:
        F.relu(x)
    ref = rec.take_reference()
    assert ref.z[0].dtype == torch.float32 and ref.nbytes == 4 * x.numel() + x.numel()
    target = _compare(rec, ref, lambda: F.relu(x + 1e-3))
    assert target.crossed.shape == target.margin.shape == (1,)  # one pair of scalars per op call
    assert not rec._crossed and not rec._margins  # nothing of the pass stays in the recorder


# ----------------------------------------------------------------- warnings and TensorBoard
def test_kink_proximity_is_one_info_line_per_module_and_op_over_many_steps_and_no_warning(tmp_path, caplog) -> None:
    model = Encoder([0.5, D, -0.5])
    batch = torch.ones(1, 2)
    with GradWatch(model, _loss, every_n_steps=1, max_overhead=None, seed=0, logdir=str(tmp_path)) as watch:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="gradwatch"):
            warnings.simplefilter("always")
            for _ in range(5):
                model.zero_grad()
                with watch.step(batch):
                    _loss(model, batch).backward()
    assert not caught, [str(w.message) for w in caught]  # half of enc.0.bias's probes were judged: no warning
    near = [r for r in caplog.records if "came near" in r.getMessage()]
    assert [r.levelno for r in near] == [logging.INFO], [r.getMessage() for r in near]
    assert "near the kink of relu in module 'enc.1' (margin " in near[0].getMessage()
    assert all(r.kink_fraction > 0 for _, r in watch.reports)
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    assert len(acc.Scalars("gradwatch/kink_margin_min")) == 5
    assert len(acc.Scalars("gradwatch/kink_fraction")) == 5
    text = acc.Tensors("gradwatch/kinks/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| enc.1 | relu | kink |" in text


def test_kink_warnings_sink_is_exported_and_validates() -> None:
    sink = gradwatch.KinkWarnings()
    with pytest.raises(TypeError, match="`report` must be a gradwatch.Report"):
        sink.write("report", 0)


# ----------------------------------------------------------------- switching inputs of selections
def _brute_force_pool_gaps(x, kernel, stride, padding, dilation, ceil_mode):
    """Winner minus runner-up of every max_pool2d window, by explicit loops."""
    values = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    gaps = torch.empty_like(values)
    n, c, oh, ow = values.shape
    for b in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    window = []
                    for u in range(kernel):
                        for v in range(kernel):
                            r, q = i * stride - padding + u * dilation, j * stride - padding + v * dilation
                            if 0 <= r < x.shape[2] and 0 <= q < x.shape[3]:
                                window.append(float(x[b, ch, r, q]))
                    window.sort(reverse=True)
                    gaps[b, ch, i, j] = window[0] - window[1] if len(window) > 1 else math.inf
    return values, gaps


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, ceil_mode",
    [(2, 2, 0, 1, False), (3, 1, 1, 1, False), (3, 2, 1, 2, True), (2, 3, 0, 1, True)],
)
def test_max_pool_switching_input_is_the_gap_to_the_runner_up(kernel, stride, padding, dilation, ceil_mode) -> None:
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values, expected = _brute_force_pool_gaps(x, kernel, stride, padding, dilation, ceil_mode)
    out = torch.ops.aten.max_pool2d_with_indices(x, [kernel] * 2, [stride] * 2, [padding] * 2, [dilation] * 2,
                                                  ceil_mode)
    found = _branch(torch.ops.aten.max_pool2d_with_indices.default,
                    (x, [kernel] * 2, [stride] * 2, [padding] * 2, [dilation] * 2, ceil_mode), {}, out, before=False)
    branch, kind = found
    assert kind == "kink" and torch.equal(branch.code, out[1]) and torch.equal(branch.zcode, out[1])
    torch.testing.assert_close(branch.z, expected)


def test_adaptive_max_pool_and_sort_switching_inputs() -> None:
    x = torch.tensor([[[3.0, 1.0, 2.5, 0.0, 4.0, 3.9]]], dtype=torch.float64)
    out = torch.ops.aten.adaptive_max_pool2d(x.unsqueeze(-2), [1, 2])
    branch, _ = _branch(torch.ops.aten.adaptive_max_pool2d.default, (x.unsqueeze(-2), [1, 2]), {}, out, before=False)
    torch.testing.assert_close(branch.z.reshape(-1), torch.tensor([0.5, 0.1], dtype=torch.float64))
    out = torch.sort(x[0, 0])
    branch, _ = _branch(torch.ops.aten.sort.default, (x[0, 0],), {}, tuple(out), before=False)
    torch.testing.assert_close(branch.z, torch.tensor([1.0, 1.5, 0.5, 0.9, 0.1], dtype=torch.float64))


def test_margin_of_a_selection_is_below_one_when_the_winner_changes() -> None:
    x = torch.tensor([[[1.0, 1.0 - 1e-6, 0.0, -1.0]]], dtype=torch.float64)
    rec = _BranchRecorder()
    with rec:
        F.max_pool1d(x, 2)
    ref = rec.take_reference()
    y = x.clone()
    y[0, 0, 1] += 3e-6  # the runner-up overtakes the winner by 2e-6
    crossed = _compare(rec, ref, lambda: F.max_pool1d(y, 2))
    assert bool(crossed.crossed[0]) and float(crossed.margin[0]) == pytest.approx(1e-6 / 3e-6, rel=1e-4)
    moved = x.clone()
    moved[0, 0, 1] -= 1e-7  # the gap grows: far
    kept = _compare(rec, ref, lambda: F.max_pool1d(moved, 2))
    assert not bool(kept.crossed[0]) and float(kept.margin[0]) == pytest.approx(10.0, rel=1e-4)


def test_pre_activations_collapsing_onto_the_kink_show_as_a_rising_kink_fraction_curve(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    batch = (torch.randn(64, 8), torch.randn(64, 1))

    def loss_fn(m, b):
        return F.mse_loss(m(b[0]), b[1])

    first = [p.detach().clone() for p in model[0].parameters()]
    with GradWatch(model, loss_fn, every_n_steps=1, max_overhead=None, seed=0, logdir=str(tmp_path)) as watch:
        for scale in (1.0, 1e-3, 1e-5):  # a stand-in for training that drives the ReLU inputs to 0
            with torch.no_grad():
                for p, p0 in zip(model[0].parameters(), first):
                    p.copy_(p0 * scale)
            model.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", KinkWarning)
                with watch.step(batch):
                    loss_fn(model, batch).backward()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    fraction = [e.value for e in acc.Scalars("gradwatch/kink_fraction")]
    margin = [e.value for e in acc.Scalars("gradwatch/kink_margin_min")]
    assert fraction[0] < 0.2 < fraction[1] < fraction[2], fraction
    assert margin[0] > margin[1] > margin[2], margin


def test_data_dependent_control_flow_is_a_discontinuity_and_earlier_ops_keep_their_margins() -> None:
    model = Scalar(lambda w: torch.relu(w - C) if bool((w > C).all()) else w.abs() * 3 + torch.relu(w))
    report = check(model, _loss, None, seed=0, coordinates=1, directions=0, joint=0)
    gt, changed = report.kink_events
    assert (gt.op, gt.call, gt.crossed) == ("gt", 0, True) and gt.margin < 1
    assert (changed.op, changed.call, changed.kind) == ("abs (op sequence changed)", 1, "discontinuity")
    assert changed.crossed and math.isnan(changed.margin) and report.tensors["w"].verdict == "kink"


def test_reference_keeps_codes_and_sees_every_single_flip() -> None:
    """A perturbed pass compares every element's branch with the reference pass: one
    flipped element among 2**20 is a crossing (at both ends and in the middle)."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rec = _BranchRecorder(margins=False)
    with rec.compare_into(None):
        F.relu(x)
    ref = rec.take_reference()
    assert ref.codes[0].dtype == torch.bool and ref.nbytes == x.numel()  # one byte per element, no z
    assert not bool(_compare(rec, ref, lambda: F.relu(x.clone())).any_crossed())
    for i in (0, 1, 12345, (1 << 19) + 7, (1 << 20) - 1):
        y = x.clone()
        y[i] = -y[i]
        assert bool(_compare(rec, ref, lambda: F.relu(y)).any_crossed()), i


def test_flips_that_cancel_in_a_weighted_sum_are_crossings() -> None:
    """Four adjacent elements at ``abs``'s kink, moved along signs (-1, 1, 1, -1): a
    position-weighted checksum with linear weights sums these flips to 0; the elementwise
    comparison of codes sees them."""
    x = torch.zeros(4, dtype=torch.float64)
    rec = _BranchRecorder()
    with rec.compare_into(None):
        x.abs()
    ref = rec.take_reference()
    moved = 1e-6 * torch.tensor([-1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    assert bool(_compare(rec, ref, lambda: moved.abs()).any_crossed())


def test_reference_code_is_not_changed_by_in_place_use_of_the_op_output() -> None:
    """Indices an op returns to the caller are copied into the reference."""
    x = torch.randn(1, 1, 64, dtype=torch.float64)
    rec = _BranchRecorder()
    with rec.compare_into(None):
        _, idx = F.max_pool1d(x, 2, return_indices=True)
        idx.zero_()
    ref = rec.take_reference()
    assert not bool(_compare(rec, ref, lambda: F.max_pool1d(x, 2, return_indices=True)).any_crossed())
    # the winner indices are the code and sign the margin's gap: one copy, counted once
    assert ref.zcode[0] is ref.codes[0] and ref.nbytes == 4 * 32 + 8 * 32


# ------------------------------------------------------------ opaque ops: register_kink
@torch.library.custom_op("gradwatch_tests::bias_relu", mutates_args=())
def _bias_relu(x: torch.Tensor, bias: torch.Tensor, wrong: bool) -> torch.Tensor:
    """relu(x + bias) as one opaque op: the kink recorder cannot see the relu inside."""
    return torch.relu(x + bias)


@_bias_relu.register_fake
def _(x, bias, wrong):
    return torch.empty_like(x)


def _bias_relu_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output)
    ctx.wrong = inputs[2]


def _bias_relu_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    g = grad * (out > 0).to(grad.dtype)
    grad_bias = g.reshape(-1, g.shape[-1]).sum(0)
    return g, (grad_bias * 1.5 if ctx.wrong else grad_bias), None


_bias_relu.register_autograd(_bias_relu_backward, setup_context=_bias_relu_context)


class _BiasRelu(nn.Module):
    def __init__(self, n: int, wrong: bool = False) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bias_relu(x, self.bias, self.wrong)


def _opaque_relu_net(seed: int, wrong: bool = False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 64, bias=False), _BiasRelu(64), nn.Linear(64, 64, bias=False),
                          _BiasRelu(64, wrong), nn.Linear(64, 4))
    batch = torch.randn(128, 10), torch.randint(0, 4, (128,))
    return model, batch


def _cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_register_kink_makes_an_opaque_ops_kinks_visible() -> None:
    """A correct custom bias+ReLU op: unregistered, probes that cross its hidden kink are
    judged and fail; registered with its switching input ``x + bias``, they are recorded as
    crossings of that op (attributed to its module), redrawn, and nothing fails."""
    seeds = range(10)

    def checks():
        reports = []
        for seed in seeds:
            model, batch = _opaque_relu_net(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                reports.append(check(model, _cross_entropy, batch, seed=seed))
        return reports

    unregistered = checks()
    assert sum(not r.ok for r in unregistered) >= 1, [r.summary() for r in unregistered]
    assert not any(e.op.endswith("bias_relu") for r in unregistered for e in r.kink_events)
    gradwatch.register_kink(_bias_relu, lambda x, bias, wrong: x + bias)
    registered = checks()
    assert all(r.ok for r in registered), [str(r) for r in registered if not r.ok]
    ops = {(e.module, e.op) for r in registered for e in r.kink_events}
    assert {("1", "bias_relu"), ("3", "bias_relu")} <= ops, ops
    # a wrong backward of the same registered op is still caught, on the right tensor
    model, batch = _opaque_relu_net(0, wrong=True)
    report = check(model, _cross_entropy, batch, seed=0)
    assert {t.name for t in report.failures} == {"3.bias"}, str(report)


def test_register_kink_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match="`op` must be a torch.library custom op, .* got str 'relu'"):
        gradwatch.register_kink("relu", lambda x: x)
    with pytest.raises(TypeError, match="`switching_input` must be callable, got int"):
        gradwatch.register_kink(_bias_relu, 3)
    with pytest.raises(ValueError, match="`kind` must be 'kink' or 'discontinuity', got 'jump'"):
        gradwatch.register_kink(_bias_relu, lambda x, b, w: x, kind="jump")


def test_a_switching_input_that_returns_no_tensor_names_the_op() -> None:
    @torch.library.custom_op("gradwatch_tests::scaled", mutates_args=())
    def scaled(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    scaled.register_autograd(lambda ctx, g: 2 * g)
    gradwatch.register_kink(torch.ops.gradwatch_tests.scaled.default, lambda x: 1.0)
    model = nn.Linear(3, 1)
    with pytest.raises(TypeError, match="registered for gradwatch_tests.scaled.default must return a floating tensor, got float"):
        check(model, lambda m, x: scaled(m(x)).sum(), torch.randn(2, 3), seed=0)

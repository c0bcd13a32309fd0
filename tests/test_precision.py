"""Verdicts true to the precision a kernel really computes in (issue 22).

Kernels (Triton, CUDA, NumPy-backed Functions) that take float64 and compute in float32
inside: the measured precision of the float64 evaluation (gradwatch._precision) sets the
step and the error bars; every verdict carries its resolving power; a check too coarse to
resolve a tensor says ``inconclusive``; a broken float64 path is reported as such; the
smallest check still compares the training gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import RESOLVING_BOUND, check
from test_judging import _Bfloat16RoundTrip  # a loss that is a staircase at any float64 step
from zoo import CORRECT, Mlp, classification_loss


class _TanhLinear(torch.autograd.Function):
    """``tanh(x @ w.T)`` computed in float32 whatever the dtype it is handed (as most Triton
    kernels do: load, ``.to(tl.float32)``, compute, store in the caller's dtype); correct."""

    @staticmethod
    def forward(ctx, x, w):
        y = np.tanh(x.detach().numpy().astype(np.float32) @ w.detach().numpy().astype(np.float32).T)
        ctx.save_for_backward(x, w)
        ctx.y = y
        return torch.from_numpy(y).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        d = g.detach().numpy().astype(np.float32) * (1 - ctx.y**2)
        dx = torch.from_numpy(d @ w.detach().numpy().astype(np.float32)).to(x.dtype)
        dw = torch.from_numpy(d.T @ x.detach().numpy().astype(np.float32)).to(w.dtype)
        return dx, dw


class _TanhLinearBug(_TanhLinear):
    """The same kernel with its weight gradient 2% off on 1/8 of the rows."""

    @staticmethod
    def backward(ctx, g):
        dx, dw = _TanhLinear.backward(ctx, g)
        dw = dw.clone()
        dw[: dw.shape[0] // 8] *= 1.02
        return dx, dw


class _Kernel(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.fn = fn
        self.weight = nn.Parameter(torch.randn(32, 16) / 4)

    def forward(self, x):
        return self.fn.apply(x, self.weight)


def _float32_inside(seed: int, fn: type[torch.autograd.Function] = _TanhLinear):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), _Kernel(fn), nn.Linear(32, 4))
    batch = (torch.randn(16, 8), torch.randint(0, 4, (16,)))
    return model, batch


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_a_kernel_computing_in_float32_inside_is_measured_and_never_raises_a_false_alarm() -> None:
    # before: 2 false alarms in these 20 seeds (seeds 3 and 16), passes at err/tol up to 1.2
    # and per-probe resolving power ~1e-2 (the float64 step 6e-6 divides float32 rounding)
    for seed in range(20):
        model, batch = _float32_inside(seed)
        report = check(model, _loss, batch, seed=seed)
        assert report.ok and report.verdict == "pass", str(report)
        assert report.measured_precision == "~float32", str(report)
        assert 1e-12 < report.loss_noise < 1e-6
        assert "computes in ~float32 inside" in str(report)
        for t in report.tensors.values():
            assert t.verdict == "pass" and t.resolving_power < 1e-2, (t.name, t.resolving_power)
            assert all(p.step > gradwatch.engine.DEFAULT_STEP for p in t.probes)  # the measured step


def test_a_planted_bug_in_a_float32_inside_kernel_is_caught_in_every_seed() -> None:
    for seed in range(10):
        model, batch = _float32_inside(seed, _TanhLinearBug)
        report = check(model, _loss, batch, seed=seed)
        assert [t.name for t in report.failures] == ["1.weight"], str(report)


def test_the_hook_at_defaults_on_a_float32_inside_kernel_is_quiet_and_catches_the_bug() -> None:
    # before: 2 of 20 runs raised a false alarm, and 98 of 140 tensor verdicts were "skipped"
    for fn, expect in ((_TanhLinear, False), (_TanhLinearBug, True)):
        for seed in range(6):
            model, _ = _float32_inside(seed, fn)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            watch = gradwatch.GradWatch(model, _loss, seed=seed, every_n_steps=5, max_overhead=None, on_failure="warn")
            gen = torch.Generator().manual_seed(seed)
            with pytest.warns(gradwatch.GradientCheckWarning) if expect else _nothing():
                for _ in range(6):
                    batch = (torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen))
                    opt.zero_grad()
                    with watch.step(batch):
                        _loss(model, batch).backward()
                    opt.step()
            verdicts = [t.verdict for _, r in watch.reports for t in r.tensors.values()]
            assert ("fail" in verdicts) == expect, verdicts
            assert "skipped" not in verdicts and "inconclusive" not in verdicts, verdicts


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_float64_model_is_measured_float64_and_keeps_float64_steps() -> None:
    case = CORRECT["layernorm_gelu"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    assert report.measured_precision == "float64" and report.loss_noise < 1e-13
    assert "computes in" not in str(report)
    params = dict(case.model.named_parameters())
    for t in report.tensors.values():
        for p in t.probes:
            if p.kind == "coordinate" and not p.replacement:
                assert p.step == pytest.approx(6e-6 * max(1.0, abs(float(params[t.name].detach()[p.index]))))


def test_every_pass_resolves_errors_below_the_bound() -> None:
    for name in ("mlp_relu_dropout", "cnn_bn_pool", "transformer"):
        for seed in range(2):
            case = CORRECT[name](seed)
            report = check(case.model, case.loss_fn, case.batch, seed=seed)
            for t in report.tensors.values():
                if t.verdict == "pass" and t.probes:
                    assert t.resolving_power <= RESOLVING_BOUND, (name, t.name, t.resolving_power)
                    judged = [p for p in t.probes if not p.kink and not p.flat]
                    assert t.resolving_power == min(p.resolving_power for p in judged)
                    for p in judged:  # the tolerance over the derivative's size (at least |numerical|)
                        assert p.resolving_power <= p.tolerance / abs(p.numerical) if p.numerical else True


def test_a_check_too_coarse_to_resolve_a_tensor_says_inconclusive_not_pass() -> None:
    # before: "pass" at rel_error 0.97 and 1.0 (nothing verified), and a false alarm at seed 2
    for seed in range(3):
        torch.manual_seed(seed)
        model = Mlp(nn.Linear(8, 16), lambda h: torch.tanh(_Bfloat16RoundTrip.apply(h)), 16)
        gen = torch.Generator().manual_seed(seed)
        batch = (torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen))
        report = check(model, classification_loss, batch, seed=seed)
        assert report.ok, str(report)
        assert {t.verdict for t in report.tensors.values()} == {"inconclusive"}, str(report)
        assert report.verdict == "inconclusive"
        for t in report.tensors.values():
            assert "register_reference" in t.reason and "check_module" in t.reason
            assert not t.resolving_power <= RESOLVING_BOUND


class _Scale(torch.autograd.Function):
    """``x * w``, correct in float32; its float64 backward is garbage (as a released
    LayerNorm kernel's is), or with ``bug`` wrong in every precision."""

    bug = False

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = (g * x).sum(0)
        if g.dtype == torch.float64:
            gw = gw * 1.7 + 0.3
        if _Scale.bug:
            gw = gw * 1.1
        return g * w, gw


class _ScaleLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16))

    def forward(self, x):
        return _Scale.apply(x, self.w)


@pytest.mark.parametrize("smallest", [False, True], ids=["full", "smallest"])
@pytest.mark.parametrize("bug", [False, True])
def test_a_broken_float64_path_is_reported_and_not_blamed_on_the_training_gradient(bug: bool, smallest: bool,
                                                                                    monkeypatch) -> None:
    # before: FAIL "'1.w'[...]: autograd=... rel_err=1 ... look at tensor hooks, code that edits .grad";
    # the smallest check (the adapters' first: the joint probe alone, a coarse gap test) failed every
    # tensor whose float64 gradient the broken path touches
    monkeypatch.setattr(_Scale, "bug", bug)
    options = {"richardson": False, "coordinates": 0, "directions": 0, "kink_resamples": 0} if smallest else {}
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), _ScaleLayer(), nn.Tanh(), nn.Linear(16, 4))
        batch = (torch.randn(16, 8), torch.randint(0, 4, (16,)))
        report = check(model, _loss, batch, seed=seed, **options)
        t = report.tensors["1.w"]
        if bug:  # wrong in training too: a failure, whatever the float64 path does
            assert "1.w" in [f.name for f in report.failures] and not t.reference_broken, str(report)
            continue
        assert report.ok and t.verdict == "pass" and t.reference_broken, str(report)
        assert "float64 path is broken, not the training gradient" in t.reason
        assert "float64 path broken (the training gradient verified without it): '1.w'" in str(report)
        if not smallest:
            assert not any(u.reference_broken for n, u in report.tensors.items() if n != "1.w")


@pytest.mark.parametrize("name", ["mlp_relu_dropout", "cnn_bn_pool"])
def test_the_smallest_check_catches_a_gradient_halved_after_backward(name: str) -> None:
    # before: the smallest check (the adapters' first, under the budget) passed: it judged the
    # probes against the float64 reference only, never the gradient training used
    for seed in range(2):
        case = CORRECT[name](seed)
        first = next(n for n, _ in case.model.named_parameters())
        case.model.zero_grad()
        replay = gradwatch.capture(case.model)
        loss = case.loss_fn(case.model, case.batch)
        loss.backward()
        with torch.no_grad():
            dict(case.model.named_parameters())[first].grad /= 2  # a hook that divides twice
        report = check(case.model, case.loss_fn, case.batch, seed=seed, grads="existing", replay=replay,
                       train_loss=loss, richardson=False, kink_resamples=0, coordinates=0, directions=0)
        assert [t.name for t in report.failures] == [first], str(report)
        assert not math.isnan(report.tensors[first].gap_ratio) and report.tensors[first].gap_ratio > 10


def test_the_smallest_check_measures_the_precision_only_where_backward_code_is_not_torchs() -> None:
    """The adapters' smallest check skips the four evaluations of the precision measurement when
    the float64 pass's graph holds torch's own derivatives alone (they compute in float64); a
    custom autograd.Function or torch.library op may compute below it, and is measured."""
    from gradwatch._evaluation import _kernels

    smallest = {"richardson": False, "coordinates": 0, "directions": 0, "kink_resamples": 0}
    case = CORRECT["layernorm_gelu"](0)
    plain = check(case.model, case.loss_fn, case.batch, seed=0, **smallest)
    assert plain.ok and plain.measured_precision is None, str(plain)
    model, batch = _float32_inside(0)
    inside = check(model, _loss, batch, seed=0, **smallest)
    assert inside.ok and inside.measured_precision == "~float32", str(inside)
    assert check(model, _loss, batch, seed=0).measured_precision == "~float32"  # the full check measures always

    @torch.library.custom_op("gwtest_precision::sine", mutates_args=())
    def sine(x: torch.Tensor) -> torch.Tensor:
        return x.sin()

    sine.register_autograd(lambda ctx, g: g * ctx.x.cos(),
                           setup_context=lambda ctx, inputs, output: setattr(ctx, "x", inputs[0]))
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert _kernels(((x @ torch.ones(4, 3, dtype=torch.float64)).relu().sum() + x[1:].pow(2).sum()).grad_fn) == ()
    (kernel,) = _kernels((sine(x) * 2).sum().grad_fn)  # torch's Function made for the op, named after it
    assert kernel.endswith("GeneratedBackwardFor_gwtest_precision_sine_default"), kernel
    assert inside.kernels == (f"{_TanhLinear.__module__}._TanhLinear",), inside.kernels


@pytest.mark.parametrize("seed", range(3))
def test_the_smallest_watched_step_measures_only_kernels_its_local_checks_did_not_measure_in_float64(
        seed: int, monkeypatch) -> None:
    """At the smallest check (``GradWatch``'s step 0) the module-local checks run first, as the
    joint probe alone at ±h; a kernel they measured computing in float64 is not measured again
    on the whole model (four float64 evaluations of it fewer); one computing in float32 inside
    is, and the whole model's steps follow it; its module gets the full local check. Planted bugs
    are named either way."""
    from zoo import CustomLinear

    measured_on = []
    measure = gradwatch.engine._measure_noise

    def counted(ev, keys, *args):
        measured_on.append(keys)
        return measure(ev, keys, *args)

    monkeypatch.setattr(gradwatch.engine, "_measure_noise", counted)

    def watched(model, batch):
        measured_on.clear()
        watch = gradwatch.GradWatch(model, _loss, seed=seed, on_failure=lambda report: None)  # the defaults
        with watch.step(batch):
            _loss(model, batch).backward()
        return watch.last_report

    for bug in (None, "wrong_row"):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), CustomLinear(16, 16, bug=bug), nn.Tanh(), nn.Linear(16, 4))
        report = watched(model, (torch.randn(32, 8), torch.randint(0, 4, (32,))))
        local = [t for t in report.tensors.values() if "::" in t.name]
        assert {t.name for t in local} == {"2::input[0]", "2::weight", "2::bias"}, str(report)
        assert all(p.kind == "joint" or t.verdict == "fail" for t in local for p in t.probes), str(report)
        assert len(measured_on) == 1, measured_on  # the local check's measurement alone
        assert report.measured_precision is None and report.kernels == ("zoo.LinearFn",), str(report)
        if bug is None:
            assert report.ok, str(report)
        else:
            assert [t.name for t in report.failures] == ["2.weight", "2::weight"], str(report)
    for fn in (_TanhLinear, _TanhLinearBug):
        model, batch = _float32_inside(seed, fn)
        report = watched(model, batch)
        # the smallest local check's; below float64, the module's full local check's (the joint probe
        # alone at ±h resolves such a kernel to ~1e-2, the full check to ~3e-4); the whole model's
        assert [len(keys) for keys in measured_on] == [2, 2, 5], measured_on
        assert report.measured_precision == "~float32", str(report)
        assert any(p.kind == "coordinate" for p in report.tensors["1::weight"].probes), str(report)
        assert report.ok == (fn is _TanhLinear), str(report)

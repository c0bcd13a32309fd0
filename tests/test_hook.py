"""The plain-PyTorch hook: scheduling, which gradient, on_failure, no side effects."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
import gradwatch._watch
import gradwatch.hook
import torch
from torch import nn

from gradwatch import GradientCheckError, GradientCheckWarning, GradWatch, KinkWarning, UnreliableCheckWarning
from zoo import (
    BUGS,
    CORRECT,
    TRAINING_ONLY_BUGS,
    assert_log_lines,
    assert_same_state,
    classification_loss,
    training_state,
)


class DropoutBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3)
        )

    def forward(self, x):
        return self.net(x)


def _batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _train(model, batches, watch=None, optimizer_cls=torch.optim.Adam):
    opt = optimizer_cls(model.parameters(), lr=1e-2)
    for batch in batches:
        opt.zero_grad()
        if watch is None:
            classification_loss(model, batch).backward()
        else:
            with watch.step(batch):
                classification_loss(model, batch).backward()
        opt.step()
    return opt


def test_training_with_the_hook_is_bit_identical_to_training_without() -> None:
    batches = _batches(7)
    torch.manual_seed(0)
    plain = DropoutBN()
    opt_plain = _train(plain, batches)
    state_plain = training_state(plain, opt_plain)

    torch.manual_seed(0)
    watched = DropoutBN()
    watch = GradWatch(watched, classification_loss, every_n_steps=2, max_overhead=None, seed=0)
    opt_watched = _train(watched, batches, watch)
    assert_same_state(state_plain, training_state(watched, opt_watched))
    assert [s for s, _ in watch.reports] == [0, 2, 4, 6]
    assert all(r.ok and r.reliable for _, r in watch.reports), [str(r) for _, r in watch.reports]


def test_check_step_leaves_state_as_without_hook_even_when_the_check_raises() -> None:
    def loss_fn(model, batch):
        loss = classification_loss(model, batch)
        if loss.dtype == torch.float64:
            raise RuntimeError("no float64 kernel")
        return loss

    batch = _batches(1)[0]
    torch.manual_seed(0)
    plain = DropoutBN()
    classification_loss(plain, batch).backward()
    expected = training_state(plain)

    torch.manual_seed(0)
    watched = DropoutBN()
    watch = GradWatch(watched, loss_fn, every_n_steps=1, max_overhead=None, seed=0,
                      options=gradwatch.ProbeOptions(precision="float64"))
    with pytest.raises(RuntimeError, match="no float64 kernel"):
        with watch.step(batch):
            loss_fn(watched, batch).backward()
    assert_same_state(expected, training_state(watched))


def _failed(report, wrong) -> bool:
    """Exactly the ``wrong`` tensors failed in the whole-model check, and a module-local check
    (``<module>::<tensor>``, GradWatch(modules="suspects")) failed only in a module holding one."""
    whole = {t.name for t in report.failures if "::" not in t.name}
    local = {t.name.partition("::")[0] for t in report.failures if "::" in t.name}
    return whole == wrong and all(any(w.startswith(m + ".") for w in wrong) for m in local)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_hook_catches_planted_bugs(bug: str) -> None:
    case = BUGS[bug](0)
    seen = []
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure=seen.append, seed=0)
    with watch.step(case.batch):
        case.loss_fn(case.model, case.batch).backward()
    assert len(seen) == 1 and seen[0] is watch.last_report
    assert _failed(watch.last_report, case.wrong)


@pytest.mark.parametrize("name", ["embedding_padding", "empty_parameter"])
def test_hook_is_quiet_on_padding_rows_and_empty_parameters(name: str) -> None:
    """Issue 12 items 6 and 8 through the hook: the padding row is not probed, empty tensors are skipped,
    also under an overhead budget that checks a few tensors per step."""
    for max_overhead in (None, 0.05):
        case = CORRECT[name](0)
        opt = torch.optim.Adam(case.model.parameters(), lr=1e-2)
        watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=max_overhead, on_failure="raise",
                          seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UnreliableCheckWarning)
            for _ in range(4):
                opt.zero_grad()
                with watch.step(case.batch):
                    case.loss_fn(case.model, case.batch).backward()
                opt.step()
        assert watch.reports and all(r.verdict == "pass" for _, r in watch.reports), [str(r) for _, r in watch.reports]
        for _, r in watch.reports:
            for t in r.tensors.values():
                if not math.prod(t.shape):
                    assert t.verdict == "skipped" and t.reason.startswith("empty tensor")
                if t.name == "emb.weight" and t.verdict == "pass":
                    assert t.excluded.startswith("row 0 excluded") and all(p.index[0] != 0 for p in t.probes if p.index)


def test_on_failure_raise_carries_the_report_after_restoring() -> None:
    case = BUGS["wrong_sign"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure="raise", seed=0)
    with pytest.raises(GradientCheckError) as info:
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch).backward()
    assert info.value.report is watch.last_report
    assert "'fc1.weight'[" in str(info.value)
    assert isinstance(info.value, AssertionError)
    fresh = BUGS["wrong_sign"](0)
    fresh.loss_fn(fresh.model, fresh.batch).backward()
    after = training_state(case.model)
    expected = training_state(fresh.model)
    for key in ("rng/torch", "rng/numpy", "rng/python"):
        after.pop(key), expected.pop(key)
    assert_same_state(expected, after)


def test_on_failure_warn_uses_the_failure_message() -> None:
    case = BUGS["bias_mean"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=0)
    with pytest.warns(GradientCheckWarning, match=r"'fc1.bias'\[\d+\]: autograd=.* numerical=.* rel_err="):
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch).backward()


def test_correct_model_raises_nothing() -> None:
    case = CORRECT["transformer"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure="raise", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch).backward()
    assert watch.last_report.ok and watch.last_report.step == 0


def test_schedule_every_n_steps_starts_at_step_zero() -> None:
    case = CORRECT["layernorm_gelu"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=3, max_overhead=None, seed=0)
    for _ in range(8):
        case.model.zero_grad()
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch).backward()
    assert [s for s, _ in watch.reports] == [0, 3, 6]
    assert watch.global_step == 8


def test_seeds_differ_per_check_and_follow_the_base_seed() -> None:
    def run(seed):
        case = CORRECT["layernorm_gelu"](0)
        watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=seed)
        for _ in range(2):
            case.model.zero_grad()
            with watch.step(case.batch):
                case.loss_fn(case.model, case.batch).backward()
        return [r.seed for _, r in watch.reports]

    a, b = run(5), run(5)
    assert a == b and a[0] != a[1]
    assert run(6) != a


def test_gradient_is_the_one_this_block_produced() -> None:
    """Stale .grad from an earlier step (no zero_grad) must not count as a bug."""
    case = CORRECT["layernorm_gelu"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure="raise", seed=0)
    case.loss_fn(case.model, case.batch).backward()  # accumulation window: .grad already set
    with watch.step(case.batch):
        case.loss_fn(case.model, case.batch).backward()
    assert watch.last_report.ok


def test_two_backward_calls_in_one_block_are_summed() -> None:
    case = CORRECT["layernorm_gelu"](0)
    half = lambda m, b: 0.5 * classification_loss(m, b)  # noqa: E731
    watch = GradWatch(case.model, classification_loss, every_n_steps=1, max_overhead=None, on_failure="raise", seed=0)
    with watch.step(case.batch):
        half(case.model, case.batch).backward()
        half(case.model, case.batch).backward()
    assert watch.last_report.ok and watch.last_report.reliable


def test_scaled_loss_is_reported_unreliable_not_as_a_bug() -> None:
    case = CORRECT["layernorm_gelu"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure="raise", seed=0)
    with pytest.warns(UnreliableCheckWarning, match="differs from the training loss"):
        with watch.step(case.batch):
            (case.loss_fn(case.model, case.batch) / 4).backward()
    assert not watch.last_report.reliable and watch.last_report.ok


def test_nan_in_a_gradient_is_its_own_verdict_not_a_nan_error() -> None:
    case = CORRECT["layernorm_gelu"](0)

    def poison(grad):
        grad = grad.clone()
        grad[1, 2] = float("nan")
        return grad

    case.model[0].weight.register_hook(poison)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure="raise", seed=0)
    with pytest.raises(GradientCheckError, match=r"'0.weight': non-finite gradient, first at '0.weight'\[1, 2\]"):
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch).backward()
    tc = watch.last_report.tensors["0.weight"]
    assert tc.verdict == "nonfinite" and "'0.weight'[1, 2]" in tc.reason
    assert watch.last_report.verdict == "nonfinite"


def test_step_without_backward_is_a_clear_error() -> None:
    case = CORRECT["layernorm_gelu"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None)
    with pytest.raises(ValueError, match="call loss.backward\\(\\) inside the with-block"):
        with watch.step(case.batch):
            case.loss_fn(case.model, case.batch)


def test_non_check_steps_install_nothing() -> None:
    case = CORRECT["layernorm_gelu"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=10, max_overhead=None)
    with watch.step(case.batch):  # step 0 is checked
        assert all(p._backward_hooks for p in case.model.parameters())
        case.loss_fn(case.model, case.batch).backward()
    with watch.step(case.batch):
        assert all(not p._backward_hooks for p in case.model.parameters())
        assert not torch.overrides._get_current_function_mode_stack()


def test_errors_in_the_block_propagate_without_a_check() -> None:
    case = CORRECT["layernorm_gelu"](0)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None)
    with pytest.raises(KeyError):
        with watch.step(case.batch):
            raise KeyError("user error")
    assert watch.reports == [] and all(not p._backward_hooks for p in case.model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be a positive int, got 0"),
        ({"every_n_steps": 2.0}, ValueError, "got 2.0"),
        ({"every_n_steps": True}, ValueError, "got True"),
        ({"on_failure": "explode"}, ValueError, "`on_failure` must be 'warn', 'raise' or a callable.*'explode'"),
        ({"seed": "x"}, ValueError, "`seed`"),
        ({"writer": object(), "logdir": "runs"}, ValueError, "not both"),
        ({"writer": object()}, TypeError, "`writer` must be a SummaryWriter"),
        ({"logdir": ""}, ValueError, "`logdir` must be a non-empty str"),
        ({"prefix": ""}, ValueError, "`prefix`"),
        ({"options": {"coordinates": -1}}, TypeError, "`options` must be None or a gradwatch.ProbeOptions, got dict"),
        ({"sinks": [object()]}, TypeError, "`sinks` must be None or a list of sinks"),
        ({"max_overhead": 0}, ValueError, r"`max_overhead` must be None or a fraction in \(0, 1\].*got 0"),
        ({"max_overhead": 1.5}, ValueError, "got 1.5"),
        ({"max_overhead": "2%"}, ValueError, "got '2%'"),
        ({"max_overhead": True}, ValueError, "got True"),
        ({"scaler": object()}, TypeError, "`scaler` must be None or a torch.amp.GradScaler, got object"),
    ],
)
def test_bad_arguments(kwargs, error, match, tmp_path) -> None:
    with pytest.raises(error, match=match):
        GradWatch(nn.Linear(2, 2), classification_loss, **kwargs)


def test_bad_model_and_loss_fn() -> None:
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        GradWatch("model", classification_loss)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        GradWatch(nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        GradWatch(nn.Linear(2, 2).requires_grad_(False), classification_loss)


def test_is_check_step_validates_and_follows_the_schedule() -> None:
    watch = GradWatch(nn.Linear(2, 2), classification_loss, every_n_steps=4, max_overhead=None)
    assert [watch.is_check_step(s) for s in range(6)] == [True, False, False, False, True, False]
    assert watch.is_check_step()  # the next step is step 0
    with pytest.raises(ValueError, match="`step` must be a non-negative int, got -3"):
        watch.is_check_step(-3)


def test_autocast_gradients_get_the_autocast_precision() -> None:
    ok = CORRECT["layernorm_gelu"](0)
    bad = BUGS["wrong_sign"](0)
    for case in (ok, bad):
        watch = GradWatch(
            case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure=lambda r: None, seed=0
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with watch.step(case.batch):
                case.loss_fn(case.model, case.batch).backward()
        report = watch.last_report
        assert report.grad_precision == "bfloat16" and report.grad_dtype == "float32"
        assert report.reliable, report.reason
        assert _failed(report, case.wrong), str(report)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_non_check_steps_run_no_tensor_op_no_capture_no_check(monkeypatch) -> None:
    case = CORRECT["layernorm_gelu"](0)
    calls = []
    for module, name in ((gradwatch.hook, "capture"), (gradwatch._watch, "_check_with")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    for max_overhead in (None, 0.02):
        watch = GradWatch(case.model, case.loss_fn, every_n_steps=5, max_overhead=max_overhead, seed=0)
        with watch.step(case.batch):  # step 0 is checked
            case.loss_fn(case.model, case.batch).backward()
        assert calls == ["capture", "_check_with"]
        calls.clear()
        for _ in range(4):
            with _CountOps() as counted:
                with watch.step(case.batch):  # gradwatch's own work on a non-check step
                    pass
            assert counted.ops == [] and calls == []  # no tensor op: no .item(), no sync, no allocation


def test_budget_first_check_covers_every_tensor_with_the_joint_probe() -> None:
    """Before any measurement a check is assumed to cost one training step per loss evaluation."""
    case = CORRECT["layernorm_gelu"](0)
    names = [n for n, _ in case.model.named_parameters()]
    # 2% of 100 steps: 2 evaluations, less than the smallest check: the joint probe alone, at ±h
    watch = GradWatch(case.model, case.loss_fn, seed=0, on_failure="raise")
    with watch.step(case.batch):
        case.loss_fn(case.model, case.batch).backward()
    report = watch.last_report
    assert [p.kind for p in report.joint] == ["joint"] and not report.joint[0].failed and report.reference
    assert all(t.verdict == "pass" and not t.probes and "verified jointly" in t.reason for t in report.tensors.values())
    assert list(report.tensors) == names
    assert watch.max_overhead == 0.02
    # 100% of 100 steps: 100 evaluations, the joint probe + 23 probes: every tensor, 2 coordinates, 1 direction
    watch = GradWatch(case.model, case.loss_fn, max_overhead=1.0, seed=0, on_failure="raise")
    with watch.step(case.batch):
        case.loss_fn(case.model, case.batch).backward()
    assert all(len(t.probes) == 3 for t in watch.last_report.tensors.values())
    assert len(watch.last_report.joint) == 1


def test_the_smallest_check_redraws_no_kinked_coordinate_and_a_full_check_does() -> None:
    """A layer whose every pre-activation sits at the ReLU kink: any coordinate of its
    weight crosses. The budgeted first check (the smallest: the joint probe alone) has no
    coordinate to redraw and its joint probe crosses at every step; an unbudgeted check
    redraws coordinates (kink_resamples=4)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    batch = torch.randn(8, 3)

    def loss_fn(m, x):
        return m(x).pow(2).mean()

    for budget, probes, redrawn in ((0.02, 0, 0), (None, 4 + 1 + 4, 4)):
        watch = GradWatch(model, loss_fn, seed=0, max_overhead=budget, on_failure="raise")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KinkWarning)
            with watch.step(batch):
                loss_fn(model, batch).backward()
        weight = watch.last_report.tensors["0.weight"]
        assert (len(weight.probes), weight.resampled, weight.verdict) == (probes, redrawn, "kink"), str(weight)
        assert watch.last_report.joint[0].kink  # the joint probe crosses at every step it tries, too


def test_every_check_keeps_a_random_direction() -> None:
    case = CORRECT["layernorm_gelu"](0)
    with pytest.raises(ValueError, match="`directions` must be at least 1: a random direction .* got 0"):
        GradWatch(case.model, case.loss_fn, options=gradwatch.ProbeOptions(directions=0))
    with pytest.raises(ValueError, match="`precision` must be one of 'float64', 'native', 'auto', got 'fp32'"):
        GradWatch(case.model, case.loss_fn, options=gradwatch.ProbeOptions(precision="fp32"))


@pytest.mark.parametrize(
    ("zoo", "name", "seed"),
    [("correct", n, s) for n in ("cnn_bn_pool", "mlp_relu_dropout", "transformer") for s in range(2)]
    + [("bug", n, 0) for n in ("wrong_sign", "hook_rescale", "bias_mean")],
)
def test_autocast_entered_inside_the_block_is_replayed(zoo: str, name: str, seed: int) -> None:
    """The usual AMP pattern: autocast around the forward only, backward outside it."""
    case = (CORRECT if zoo == "correct" else BUGS)[name](seed)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, on_failure=lambda r: None,
                      seed=seed)
    with watch.step(case.batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = case.loss_fn(case.model, case.batch)
        loss.backward()
    report = watch.last_report
    assert report.reliable, report.reason
    assert report.grad_precision == "bfloat16" and report.reference
    assert _failed(report, case.wrong), str(report)


@pytest.mark.parametrize("name", ["layernorm_gelu", "bias_mean"])
def test_one_concise_log_line_per_check_and_nothing_at_warning_when_clean(name: str, caplog) -> None:
    case = (CORRECT.get(name) or BUGS[name])(0)
    verdict = "fail" if case.wrong else "pass"
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        watch = GradWatch(case.model, case.loss_fn, every_n_steps=2, max_overhead=None, seed=0,
                          on_failure=lambda report: None)
        _train(case.model, [case.batch] * 5, watch)
    assert_log_lines(caplog.records, [0, 2, 4], verdict, case.wrong)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        watch = GradWatch(case.model, case.loss_fn, every_n_steps=2, max_overhead=None, seed=0,
                          on_failure=lambda report: None)
        _train(case.model, [case.batch] * 5, watch)
    assert len(caplog.records) == (3 if case.wrong else 0)


# ------------------------------------------------------------------ GradScaler (fp16 AMP recipe)
def _amp_step(watch, model, loss_fn, batch, scaler, dtype=torch.float16):
    """One step of the PyTorch AMP recipe inside ``watch.step``; the optimizer step is the caller's."""
    with watch.step(batch):
        with torch.autocast("cpu", dtype=dtype):
            loss = loss_fn(model, batch)
        scaler.scale(loss).backward()


def _amp_train(model, batches, scaler, watch=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for batch in batches:
        opt.zero_grad()
        if watch is None:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = classification_loss(model, batch)
            scaler.scale(loss).backward()
        else:
            _amp_step(watch, model, classification_loss, batch, scaler)
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
    return opt


def _scaler_state(scaler) -> dict:
    return {f"scaler/{k}": v for k, v in scaler.state_dict().items()}


def test_gradscaler_training_is_bit_identical_and_checks_unscaled_gradients() -> None:
    """fp16 autocast + GradScaler: step 0 overflows (huge initial scale) and is skipped by the
    scaler, the later check steps compare unscaled gradients; training ends exactly as without."""
    batches = _batches(6)
    make_scaler = lambda: torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)  # noqa: E731
    torch.manual_seed(0)
    plain, plain_scaler = DropoutBN(), make_scaler()
    opt_plain = _amp_train(plain, batches, plain_scaler)
    expected = {**training_state(plain, opt_plain), **_scaler_state(plain_scaler)}

    torch.manual_seed(0)
    watched, scaler = DropoutBN(), make_scaler()
    watch = GradWatch(watched, classification_loss, every_n_steps=2, max_overhead=None, seed=0, scaler=scaler,
                      on_failure="raise")
    opt_watched = _amp_train(watched, batches, scaler, watch)
    assert_same_state(expected, {**training_state(watched, opt_watched), **_scaler_state(scaler)})
    assert scaler.get_scale() < 2.0**20  # the overflow really happened and the scale backed off
    verdicts = [r.verdict for _, r in watch.reports]
    assert [s for s, _ in watch.reports] == [0, 2, 4] and verdicts == ["skipped", "pass", "pass"], verdicts
    for _, report in watch.reports[1:]:
        assert report.reliable and report.grad_precision == "float16", report.reason
        assert report.train_loss < 10 and report.train_loss == pytest.approx(report.replay_loss, rel=5e-2)


def test_gradscaler_overflow_step_is_skipped_with_the_reason(caplog) -> None:
    case = CORRECT["layernorm_gelu"](0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=0, scaler=scaler,
                      on_failure="raise")
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="gradwatch"):
        warnings.simplefilter("error")
        _amp_step(watch, case.model, case.loss_fn, case.batch, scaler)
    report = watch.last_report
    assert report.verdict == "skipped" and report.ok and report.step == 0
    assert "GradScaler skips this optimizer step" in report.reason and "not finite" in report.reason
    assert all(t.verdict == "skipped" and not t.probes and t.reason == report.reason
               for t in report.tensors.values())
    lines = [r for r in caplog.records if r.name == "gradwatch"]
    assert [r.levelno for r in lines] == [logging.INFO] and "SKIPPED" in lines[0].getMessage()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradscaler_catches_planted_bugs_and_stays_quiet_on_correct_models(dtype) -> None:
    for name in ("mlp_relu_dropout", "cnn_bn_pool", "transformer", "layernorm_gelu", *sorted(BUGS)):
        case = (CORRECT.get(name) or BUGS[name])(0)
        scaler = torch.amp.GradScaler("cpu")
        watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=0, scaler=scaler,
                          on_failure=lambda report: None)
        _amp_step(watch, case.model, case.loss_fn, case.batch, scaler, dtype)
        report = watch.last_report
        assert report.reliable and report.grad_precision == str(dtype)[6:], (name, report.reason)
        assert _failed(report, case.wrong), (name, str(report))


def test_scaled_backward_without_the_scaler_is_unreliable_and_a_disabled_scaler_changes_nothing() -> None:
    case = CORRECT["layernorm_gelu"](0)
    scaler = torch.amp.GradScaler("cpu")
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=0,
                      on_failure=lambda report: None)
    with pytest.warns(UnreliableCheckWarning, match="differs from the training loss"):
        _amp_step(watch, case.model, case.loss_fn, case.batch, scaler)
    assert not watch.last_report.reliable
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=0, scaler=disabled,
                      on_failure="raise")
    _amp_step(watch, case.model, case.loss_fn, case.batch, disabled)
    assert watch.last_report.reliable and watch.last_report.verdict == "pass"


# ------------------------------------------- what only the training gradient has (issue 12)
@pytest.mark.parametrize("mode", ["fp32", "bf16-autocast", "fp16-gradscaler"])
@pytest.mark.parametrize("bug", sorted(TRAINING_ONLY_BUGS))
def test_training_only_bugs_are_caught_in_every_precision(bug: str, mode: str) -> None:
    """A tensor hook that rescales a gradient by 1.5 and a kernel wrong only below float64:
    the float64 reference does not have them, the training gradient does, in fp32 and
    under bf16 / fp16 autocast alike (the precision test's guard)."""
    for seed in range(3):
        case = TRAINING_ONLY_BUGS[bug](seed)
        scaler = torch.amp.GradScaler("cpu") if mode == "fp16-gradscaler" else None
        watch = GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=seed, scaler=scaler,
                          on_failure=lambda report: None)
        with watch.step(case.batch):
            dtype = torch.float16 if scaler is not None else torch.bfloat16
            with torch.autocast("cpu", dtype=dtype, enabled=mode != "fp32"):
                loss = case.loss_fn(case.model, case.batch)
            (loss if scaler is None else scaler.scale(loss)).backward()
        report = watch.last_report
        expected = {"fp32": "float32", "bf16-autocast": "bfloat16", "fp16-gradscaler": "float16"}[mode]
        assert report.reliable and report.grad_precision == expected, report.reason
        assert _failed(report, case.wrong), (seed, str(report))

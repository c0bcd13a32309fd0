"""Joint probes (gradwatch/_joint.py): one direction over every tensor, group testing, kinks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch
from gradwatch import GradWatch, KinkWarning, check
from gradwatch._evaluation import DEFAULT_STEP
from gradwatch._gradients import _OWN_PROBES
from zoo import BUGS, CORRECT, SPARSE_BUGS, TRAINING_ONLY_BUGS, ScaledGrad

JOINT_ONLY = {"coordinates": 0, "directions": 0}
SMALLEST = {**JOINT_ONLY, "richardson": False, "reference": False}


@pytest.mark.parametrize("options", [JOINT_ONLY, SMALLEST], ids=["full", "smallest"])
@pytest.mark.parametrize("bug", sorted(BUGS) + sorted(SPARSE_BUGS))
def test_joint_probe_catches_and_localises_each_planted_bug(bug: str, options: dict) -> None:
    if bug == "small_gradient":
        pytest.skip("a tensor whose gradients are 1e-6 of the model's weighs at the joint weight floor "
                    "(0.1 of the model's RMS); its own probes catch it (test_judging, test_engine)")
    build = BUGS.get(bug) or SPARSE_BUGS[bug]
    for seed in range(3):
        case = build(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KinkWarning)
            report = check(case.model, case.loss_fn, case.batch, seed=seed, **options)
        failed = {t.name for t in report.failures}
        assert failed and failed <= case.wrong, (seed, failed, case.wrong)
        assert len(report.joint) == 1 and report.joint[0].kind == "joint"
        for t in report.failures:  # named at the element
            assert t.worst is not None and t.worst.index is not None, (seed, str(t))
        # the tensors group testing did not name were not verified by the failing joint probe
        others = [t for n, t in report.tensors.items() if n not in failed]
        assert all(t.verdict == "skipped" and "group testing named" in t.reason for t in others) or \
            report.tensors[next(iter(failed))].gap_ratio > 1.0  # a precision gap (hook) needs no group testing


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_correct_zoo_models_stay_quiet_across_seeds(name: str) -> None:
    for seed in range(4):
        case = CORRECT[name](seed)
        for options in (JOINT_ONLY, SMALLEST, {}):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", KinkWarning)
                report = check(case.model, case.loss_fn, case.batch, seed=seed, **options)
            assert report.ok, (seed, options, str(report))
            assert report.joint[0].error <= report.joint[0].tolerance
            if options:  # no probe of their own: every tensor is verified jointly, or says it could not be
                # (layer_scale: the tensors behind a 1e-4 layer scale hold too small a share of the joint
                # probe to resolve a 5% error of their own gradient; judged against the float64 reference)
                behind = name == "layer_scale" and options.get("reference", True)
                assert all(t.verdict == "pass" and "verified jointly" in t.reason or behind and (
                           t.verdict == "inconclusive" and "its share of the joint probe" in t.reason)
                           for t in report.tensors.values() if not (t.reason or "").startswith("empty tensor"))


class _Head(nn.Linear):
    """A linear layer whose bias gradient is 2% too large on 1/8 of its rows (at least one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.ones_like(self.bias)
        scale[: max(self.bias.numel() // 8, 1)] = 1.02
        return F.linear(x, self.weight, ScaledGrad.apply(self.bias, scale))


def _deep(head: type[nn.Linear] = nn.Linear) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(9):
        layers += [nn.Linear(16, 16), nn.GELU()]
    return nn.Sequential(*layers, head(16, 8))


def test_default_hook_catches_a_bug_in_the_last_tensor_of_a_20_tensor_model_within_500_steps() -> None:
    torch.manual_seed(0)
    model = _deep(_Head)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == 20 and names[-1] == "18.bias"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    watch = GradWatch(model, loss_fn, seed=0, on_failure=lambda report: None)  # the defaults otherwise
    found = None
    for step in range(500):
        batch = (torch.randn(32, 16, generator=gen), torch.randint(0, 8, (32,), generator=gen))
        with watch.step(batch):
            opt.zero_grad()
            loss_fn(model, batch).backward()
        opt.step()
        if watch.reports and watch.reports[-1][0] == step and not watch.reports[-1][1].ok:
            found = watch.reports[-1][1]
            break
    assert found is not None, "no check within 500 steps caught the bug"
    # the whole-model tensor, and the module-local check of its module (GradWatch's default modules="suspects")
    assert found.step < 500 and [t.name for t in found.failures] == ["18.bias", "18::bias"]
    # the element with the wrong gradient, located by the module-local check (its module alone),
    # to which the whole-model failure points instead of bisecting the whole model again
    assert found.failures[1].worst.index == (0,)
    assert found.failures[0].located is None and "(see '18::bias')" in found.failures[0].reason


def _near_kink() -> tuple[nn.Module, tuple, object]:
    """A correct ReLU network (float64) with one ReLU input 5e-9 from its kink."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    with torch.no_grad():
        model[0].bias[0] = 5e-9 - model[0].weight[0] @ x[0]  # sample 0, unit 0: z = 5e-9

    def loss_fn(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1])

    return model, (x, y), loss_fn


def test_a_kink_crossing_joint_probe_on_a_correct_relu_network_is_redone_smaller_without_false_alarm() -> None:
    """The joint probe at its first step crosses the kink, is redone at a step 32 or 1024
    times smaller, and then verifies the whole (correct) model."""
    model, batch, loss_fn = _near_kink()
    retried = 0
    for seed in range(6):
        for options in (JOINT_ONLY, SMALLEST):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", KinkWarning)
                report = check(model, loss_fn, batch, seed=seed, **options)
            joint = report.joint[0]
            assert report.ok and not joint.failed, str(report)
            retried += joint.step < DEFAULT_STEP / 256  # it crossed at its first step and was redone smaller
            if not joint.kink:
                assert all(t.verdict == "pass" for t in report.tensors.values())
    assert retried >= 6


def test_a_passing_joint_probe_verifies_a_tensor_whose_own_probes_all_crossed_a_kink() -> None:
    model, batch, loss_fn = _near_kink()
    upgraded = 0
    for seed in range(4):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KinkWarning)
            report = check(model, loss_fn, batch, seed=seed, coordinates=0, directions=1)
        bias = report.tensors["0.bias"]
        assert report.ok
        if bias.kink_count == len(bias.probes) and not report.joint[0].kink:  # its direction crossed
            assert bias.verdict == "pass" and "verified jointly" in bias.reason
            upgraded += 1
    assert upgraded >= 2


def test_without_localize_a_failing_joint_probe_fails_every_tensor_it_covers() -> None:
    case = BUGS["wrong_sign"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0, localize=False, **JOINT_ONLY)
    assert report.joint[0].failed
    assert all(t.verdict == "fail" and "not narrowed down" in t.reason for t in report.tensors.values())


def test_joint_option_validation_and_reproducibility() -> None:
    case = CORRECT["layernorm_gelu"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=5, joint=0)
    assert report.joint == () and all(t.reason is None for t in report.tensors.values())
    two = check(case.model, case.loss_fn, case.batch, seed=5, joint=2, **JOINT_ONLY)
    again = check(case.model, case.loss_fn, case.batch, seed=5, joint=2, **JOINT_ONLY)
    assert len(two.joint) == 2 and two.joint[0].direction_seed != two.joint[1].direction_seed
    assert [(p.direction_seed, p.numerical, p.autograd) for p in two.joint] == \
        [(p.direction_seed, p.numerical, p.autograd) for p in again.joint]
    with pytest.raises(ValueError, match="`joint` must be a non-negative int, got -1"):
        check(case.model, case.loss_fn, case.batch, joint=-1)
    with pytest.raises(ValueError, match="`coordinates` \\+ `directions` must be at least 1"):
        check(case.model, case.loss_fn, case.batch, joint=0, **JOINT_ONLY)
    assert gradwatch.Report.__dataclass_fields__["joint"].default == ()


def test_the_smallest_joint_check_takes_two_float64_passes_for_the_whole_model() -> None:
    calls = []
    case = CORRECT["layernorm_gelu"](0)

    def counting(model, batch):
        calls.append(1)
        return case.loss_fn(model, batch)

    report = check(case.model, counting, case.batch, seed=0, localize=False, **SMALLEST)
    assert len(calls) == 1 + 2  # the training forward, then θ ± h·v over every tensor at once
    assert not report.joint[0].kink and all(t.verdict == "pass" for t in report.tensors.values())


def test_tiny_models_keep_their_joint_directions_with_the_same_report(monkeypatch) -> None:
    # per-call cost on tiny ops (issue 13): over at most _CACHE_ELEMENTS elements in all, each
    # tensor's part of a joint direction (and its float64 gradient) is drawn once per check, not
    # at every pass; the numbers are those of the directions drawn again
    import gradwatch._joint as joint

    drawn = []
    direction = joint._direction
    monkeypatch.setattr(joint, "_direction", lambda *a, **k: drawn.append(1) or direction(*a, **k))
    for name in ("wrong_sign", "bias_mean"):
        case = BUGS[name](0)
        assert sum(p.numel() for p in case.model.parameters()) <= joint._CACHE_ELEMENTS
        drawn.clear()
        kept = check(case.model, case.loss_fn, case.batch, seed=0, **JOINT_ONLY)
        tensors = len(kept.tensors)
        assert len(drawn) == tensors  # once per tensor (group testing included)
        monkeypatch.setattr(joint, "_CACHE_ELEMENTS", 0)
        drawn.clear()
        again = check(case.model, case.loss_fn, case.batch, seed=0, **JOINT_ONLY)
        monkeypatch.setattr(joint, "_CACHE_ELEMENTS", 1 << 12)
        assert len(drawn) > 4 * tensors
        assert {t.name for t in kept.failures} == {t.name for t in again.failures} == case.wrong
        for p, q in zip(kept.joint, again.joint):
            assert (p.numerical, p.autograd, p.reference, p.failed) == (q.numerical, q.autograd, q.reference, q.failed)


def test_joint_passes_run_without_the_kink_recorder_when_the_model_has_no_kink(monkeypatch) -> None:
    # per-call cost on tiny ops (issue 13): when the unperturbed float64 pass ran no non-smooth op,
    # the perturbed passes do not dispatch through the recorder; with a ReLU they do
    from gradwatch.kinks import _BranchRecorder

    compared = []
    compare_into = _BranchRecorder.compare_into
    monkeypatch.setattr(_BranchRecorder, "compare_into",
                        lambda self, k: compared.append(k is not None) or compare_into(self, k))
    smooth = CORRECT["layernorm_gelu"](0)
    report = check(smooth.model, smooth.loss_fn, smooth.batch, seed=0, **JOINT_ONLY)
    assert report.ok and not report.joint[0].kink and not any(compared) and compared  # the reference pass alone
    relu = CORRECT["mlp_relu_dropout"](0)
    compared.clear()
    report = check(relu.model, relu.loss_fn, relu.batch, seed=0, **JOINT_ONLY)
    assert report.ok and sum(compared) >= 4  # ±h, ±2h of the joint probe, and the precision test's replay


# --------------------------------------------------------------- per_tensor="auto" (issue 24 item 3)
class _Deep(nn.Module):
    """A zoo model followed by 12 residual tanh blocks on its outputs: 24 more tensors, so a
    check covers more than the 16 tensors below which every tensor gets its own probes."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        torch.manual_seed(1)
        self.tail = nn.ModuleList(nn.Linear(width, width) for _ in range(12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        for layer in self.tail:
            h = h + 0.5 * torch.tanh(layer(h))
        return h


def _with_tail(case) -> nn.Module:
    with torch.no_grad():
        width = case.model(case.batch[0]).shape[-1]
    return _Deep(case.model, width)


def _check_quietly(model, case, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KinkWarning)
        return check(model, case.loss_fn, case.batch, seed=0, **kwargs)


@pytest.mark.parametrize("bug", sorted(BUGS) + sorted(SPARSE_BUGS) + sorted(TRAINING_ONLY_BUGS))
def test_many_tensors_default_check_flags_each_planted_bug_with_few_own_probes(bug: str) -> None:
    case = (BUGS.get(bug) or SPARSE_BUGS.get(bug) or TRAINING_ONLY_BUGS[bug])(0)
    model = _with_tail(case)
    report = _check_quietly(model, case)
    assert len(report.tensors) > _OWN_PROBES
    failed = {t.name.removeprefix("inner.") for t in report.failures}
    # group testing names one wrong tensor per failing joint probe; the precision test flags each
    assert failed and failed <= case.wrong, (failed, case.wrong)
    own = [n for n, t in report.tensors.items() if t.probes]
    assert len(own) <= _OWN_PROBES + 1, own  # + the tensor group testing named


@pytest.mark.parametrize("name", sorted(CORRECT))
def test_many_tensors_default_check_keeps_correct_models_quiet_and_cheap(name: str) -> None:
    case = CORRECT[name](0)
    try:
        model = _with_tail(case)
    except (IndexError, RuntimeError, TypeError):
        pytest.skip("outputs that are no batch of vectors")
    report = _check_quietly(model, case)
    assert report.reliable and report.ok, report.summary()
    own = [n for n, t in report.tensors.items() if t.probes]
    assert len(own) <= _OWN_PROBES, own
    jointly = [t for t in report.tensors.values() if t.verdict == "pass" and not t.probes]
    assert jointly and all("verified jointly" in t.reason for t in jointly)
    assert len(report.joint) == 2  # two joint directions where tensors have no probes of their own


def test_per_tensor_all_probes_every_tensor_and_auto_keeps_small_checks_unchanged() -> None:
    case = CORRECT["layernorm_gelu"](0)
    model = _with_tail(case)
    every = _check_quietly(model, case, per_tensor="all")
    assert all(t.probes for t in every.tensors.values() if t.verdict != "skipped")
    auto = _check_quietly(model, case)
    assert sum(bool(t.probes) for t in auto.tensors.values()) < len(auto.tensors) // 2
    # at most 16 tensors: "auto" is "all", probe for probe
    small = CORRECT["layernorm_gelu"](0)
    a = _check_quietly(small.model, small)
    b = _check_quietly(small.model, small, per_tensor="all")
    assert [(n, [p.numerical for p in t.probes]) for n, t in a.tensors.items()] == \
        [(n, [p.numerical for p in t.probes]) for n, t in b.tensors.items()]
    assert len(a.joint) == len(b.joint) == 1
    with pytest.raises(ValueError, match="`per_tensor` must be one of"):
        gradwatch.ProbeOptions(per_tensor="some")


def test_tensors_a_joint_probe_weighs_too_little_keep_their_own_probes() -> None:
    case = BUGS["small_gradient"](0)  # a branch scaled by 1e-6: its gradients are 1e-6 of the model's
    report = _check_quietly(_with_tail(case), case)
    assert report.tensors["inner.small.weight"].probes and report.tensors["inner.small.bias"].probes
    assert not report.tensors["tail.0.weight"].probes
    assert {t.name for t in report.failures} == {"inner.small.bias"}


@pytest.mark.parametrize("seed", range(3))
def test_the_tensor_the_module_local_check_failed_is_named_without_group_testing_and_the_others_verified(
        seed: int, monkeypatch) -> None:
    """The watch core runs the module-local checks of the suspects first; the whole-model smallest
    check leaves the tensor they failed out of its joint probe (which then verifies the others, where
    a failing joint probe over every tensor verified none) and fails it as the local check located it,
    without bisecting the whole model (group testing) or locating its element again."""
    from zoo import CustomLinear

    grouped = []
    group = gradwatch._joint._group

    def recorded(ctx, row, probe):
        grouped.append(list(row.line.names))
        return group(ctx, row, probe)

    monkeypatch.setattr(gradwatch._joint, "_group", recorded)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), CustomLinear(16, 16, bug="wrong_row"), nn.Tanh(),
                          nn.Linear(16, 4))
    batch = (torch.randn(32, 8), torch.randint(0, 4, (32,)))

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    watch = GradWatch(model, loss_fn, seed=seed, on_failure=lambda report: None)  # defaults: the smallest check
    with watch.step(batch):
        loss_fn(model, batch).backward()
    report = watch.last_report
    # the smallest check: the tensor the local check failed is left out of the joint probe, which verifies the others
    assert report.joint and not report.joint[0].failed, str(report)
    assert not any("0.weight" in names for names in grouped), grouped  # only the local check's own, if any
    assert [t.name for t in report.failures] == ["2.weight", "2::weight"], str(report)
    assert all(t.verdict in ("pass", "inconclusive") for n, t in report.tensors.items()
               if "::" not in n and n != "2.weight"), str(report)
    whole, local = report.failures
    assert whole.located is None and "(see '2::weight')" in whole.reason
    assert local.worst.index is not None and local.worst.index[0] == 2  # the wrong row, located locally

"""The pytest helper assert_gradients: planted bugs raise with a located message, correct
models pass, nothing is lost, unverifiable checks fail, and it agrees with gradcheck."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch import GradientCheckError, UnreliableCheckWarning, assert_gradients
from zoo import BUGS, CORRECT, SPARSE_BUGS, assert_same_state, classification_loss, training_state


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    return model, batch


# --------------------------------------------------------------------------- the zoo
@pytest.mark.parametrize("bug", sorted(BUGS) + sorted(SPARSE_BUGS))
def test_every_planted_bug_raises_naming_the_wrong_tensors_and_an_element(bug: str) -> None:
    case = {**BUGS, **SPARSE_BUGS}[bug](0)
    with pytest.raises(GradientCheckError) as info:
        assert_gradients(case.model, case.loss_fn, case.batch)
    assert isinstance(info.value, AssertionError)
    assert {t.name for t in info.value.report.failures} == case.wrong, str(info.value.report)
    message = str(info.value)
    for name in case.wrong:
        line = next(line for line in message.splitlines() if line.startswith(f"'{name}'"))
        assert line.startswith(f"'{name}'[") and "autograd=" in line and "numerical=" in line and "rel_err=" in line


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("bug", sorted(SPARSE_BUGS))
def test_the_joint_probe_catches_bugs_confined_to_a_few_elements(bug: str, seed: int) -> None:
    # the joint stage sees them (its probe fails), the per-tensor stage then names the element
    case = SPARSE_BUGS[bug](seed)
    with pytest.raises(GradientCheckError) as info:
        assert_gradients(case.model, case.loss_fn, case.batch, seed=seed)
    report = info.value.report
    assert {t.name for t in report.failures} == case.wrong
    assert [p.failed for p in report.joint] == [True]
    assert f"'{next(iter(case.wrong))}'[" in str(info.value)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("model", sorted(CORRECT))
def test_correct_models_pass_and_return_the_report(model: str, seed: int) -> None:
    case = CORRECT[model](seed)
    report = assert_gradients(case.model, case.loss_fn, case.batch, seed=seed)
    assert report.verdict == "pass" and report.reliable and report.seed == seed
    assert report.precision == "float64" and report.reference
    checked = [t for t in report.tensors.values() if t.verdict == "pass"]
    assert len(checked) == len([p for p in case.model.parameters() if p.numel()])  # empty ones are skipped
    # each tensor is verified by a joint probe that did not cross a kink, or by probes of its own
    joint = [t for t in checked if not t.probes]
    assert all(t.reason.startswith("verified jointly") for t in joint)
    assert not joint or any(not p.kink for p in report.joint)
    for t in checked:
        if t.probes:  # per-tensor probes: 16 coordinates (or every element) and 4 directions
            assert sum(p.kind == "direction" for p in t.probes) == 4
            assert sum(p.kind == "coordinate" and not p.replacement for p in t.probes) == min(16, math.prod(t.shape))


def test_thorough_probes_every_tensor_with_its_own_coordinates_and_directions() -> None:
    case = CORRECT["mlp_relu_dropout"](0)
    report = assert_gradients(case.model, case.loss_fn, case.batch, thorough=True)
    assert report.verdict == "pass" and len(report.joint) == 1
    for t in report.tensors.values():
        assert sum(p.kind == "direction" for p in t.probes) == 4
        assert sum(p.kind == "coordinate" and not p.replacement for p in t.probes) == min(16, math.prod(t.shape))


def _counting(loss_fn):
    calls = []

    def counted(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    return counted, calls


def test_a_correct_op_is_verified_by_joint_probes_in_a_few_passes() -> None:
    # the cost of a check in loss evaluations, not seconds: gradcheck's fast mode takes 2 per input
    # and one backward; the joint check takes a handful whatever the number of tensors
    model, batch = _tiny()
    fast, fast_calls = _counting(classification_loss)
    report = assert_gradients(model, fast, batch)
    slow, slow_calls = _counting(classification_loss)
    thorough = assert_gradients(model, slow, batch, thorough=True)
    assert report.verdict == thorough.verdict == "pass"
    assert all(not t.probes and t.reason.startswith("verified jointly") for t in report.tensors.values())
    assert [p.kind for p in report.joint] == ["joint"] and not report.joint[0].kink
    # (4 of them measure the precision the evaluation computes in: gradwatch._precision)
    assert len(fast_calls) <= 14 < 100 < len(slow_calls)


def test_a_smooth_op_takes_one_native_replay_besides_the_training_step() -> None:
    # per-call cost on tiny ops (issue 13): with grads="autograd" the training step is the replay
    # the check compares the float64 loss with, and the precision test's gradient at θ; one more
    # native pass (θ moved by ulps) measures the rounding. A tensor hook on a parameter (the step's
    # gradient is then not the replay's) or a non-smooth op (branches to compare) brings the
    # replay at θ back.
    def native_passes(model, batch, **kw):
        dtypes = []

        def loss_fn(m, b):
            dtypes.append(next(m.parameters()).dtype)
            return classification_loss(m, b)

        report = assert_gradients(model, loss_fn, batch, **kw)
        return report, sum(d == torch.float32 for d in dtypes)

    model, batch = _tiny()
    report, smooth = native_passes(model, batch)
    assert report.verdict == "pass" and smooth == 2
    handle = model[0].weight.register_hook(lambda g: g)  # a hook that changes nothing: still verified
    report, hooked = native_passes(model, batch)
    handle.remove()
    assert report.verdict == "pass" and hooked == 3
    model[1] = nn.ReLU()
    report, relu = native_passes(model, batch)
    assert report.verdict == "pass" and relu == 3


class _SmallBranch(nn.Module):
    """A main head plus a branch scaled by 1e-6: the branch's gradients are 1e-6 of the head's."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Linear(8, 3)
        self.small = nn.Linear(8, 3)

    def forward(self, x):
        return self.main(x) + 1e-6 * self.small(x)


def test_tensors_with_far_smaller_gradients_get_probes_of_their_own() -> None:
    # a joint probe weighs them almost nothing: they are probed per tensor, the others jointly
    torch.manual_seed(0)
    model = _SmallBranch()
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    report = assert_gradients(model, classification_loss, batch)
    own = {n for n, t in report.tensors.items() if t.probes}
    assert own == {"small.weight", "small.bias"} and report.verdict == "pass"
    assert all(report.tensors[n].reason.startswith("verified jointly") for n in ("main.weight", "main.bias"))
    # a bug in them is caught and named: the zoo's small_gradient case above


def test_same_seed_draws_the_same_probes() -> None:
    model, batch = _tiny()
    a = assert_gradients(model, classification_loss, batch)
    b = assert_gradients(model, classification_loss, batch)
    assert a.seed == b.seed == 0
    drawn = [[(p.kind, p.index, p.direction_seed) for p in (*r.probes, *r.joint)] for r in (a, b)]
    assert drawn[0] == drawn[1] and drawn[0]


# ------------------------------------------------------------------------ which gradient
@pytest.mark.parametrize("model", ["mlp_relu_dropout", "cnn_bn_pool"])
def test_nothing_is_lost_grad_buffers_rng_stay_as_they_were(model: str) -> None:
    case = CORRECT[model](0)
    params = list(case.model.parameters())
    params[0].grad = torch.full_like(params[0], 7.0)  # a stale .grad: neither read nor changed
    before = training_state(case.model)
    assert_gradients(case.model, case.loss_fn, case.batch)
    assert_same_state(before, training_state(case.model))
    assert params[1].grad is None


def test_existing_grad_is_compared_when_asked() -> None:
    model, batch = _tiny()
    with pytest.raises(ValueError, match="`grads='existing'` needs a populated .grad"):
        assert_gradients(model, classification_loss, batch, grads="existing")
    classification_loss(model, batch).backward()
    assert assert_gradients(model, classification_loss, batch, grads="existing").ok
    model[0].bias.grad *= 3  # an edit after accumulation
    with pytest.raises(GradientCheckError) as info:
        assert_gradients(model, classification_loss, batch, grads="existing")
    assert [t.name for t in info.value.report.failures] == ["0.bias"]


def test_a_gradient_mapping_checks_only_those_tensors() -> None:
    model, batch = _tiny()
    grads = dict(zip(["0.weight"], torch.autograd.grad(classification_loss(model, batch), [model[0].weight])))
    report = assert_gradients(model, classification_loss, batch, grads=grads)
    assert [n for n, t in report.tensors.items() if t.verdict == "pass"] == ["0.weight"]
    with pytest.raises(GradientCheckError, match="'0.weight'\\["):
        assert_gradients(model, classification_loss, batch, grads={"0.weight": -grads["0.weight"]})


class _DropsWeightGrad(torch.autograd.Function):
    """``x * w`` whose backward returns None for ``w``: autograd then has no gradient for it."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * w, None  # the bug: the weight gradient is forgotten


class _Scale(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.b = nn.Parameter(torch.zeros(5))
        self.unused = nn.Parameter(torch.ones(3))  # really unused: its zero gradient is right
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.w) + self.b


def test_a_parameter_without_any_gradient_is_checked_against_zero() -> None:
    x = torch.randn(8, 5)
    loss_fn = lambda m, b: m(b).pow(2).sum()  # noqa: E731
    buggy = _Scale(_DropsWeightGrad.apply)
    # gradwatch.check skips a tensor that gets no gradient; the test helper compares it with 0
    skipped = gradwatch.check(buggy, loss_fn, x, seed=0)
    assert skipped.ok and skipped.tensors["w"].verdict == "skipped" and skipped.tensors["b"].verdict == "pass"
    with pytest.raises(GradientCheckError) as info:
        assert_gradients(buggy, loss_fn, x)
    assert [t.name for t in info.value.report.failures] == ["w"]
    assert "'w'[" in str(info.value) and "autograd=0.0e+00 " in str(info.value)
    report = assert_gradients(_Scale(torch.mul), loss_fn, x)
    assert {n: t.verdict for n, t in report.tensors.items()} == {"w": "pass", "b": "pass", "unused": "pass"}


# --------------------------------------------------------------------- nothing verified
def test_unreliable_check_fails_unless_allowed() -> None:
    model, batch = _tiny()
    gen = torch.Generator().manual_seed(0)  # a generator of its own: its draws are not replayed
    lossy = lambda m, b: classification_loss(m, b) * (1 + torch.rand((), generator=gen))  # noqa: E731
    with pytest.raises(AssertionError, match="could not verify the gradients of Sequential: the check was unreliable"):
        assert_gradients(model, lossy, batch)
    with pytest.warns(UnreliableCheckWarning):
        report = assert_gradients(model, lossy, batch, allow_unverified=True)
    assert not report.reliable and report.verdict == "unreliable"


class _AtTheKink(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))  # |w| at w = 0: every probe crosses the kink
        self.lin = nn.Linear(4, 1)

    def forward(self, x):
        return self.lin(x * self.w.abs() + x)


def test_a_tensor_whose_every_probe_crossed_a_kink_fails_unless_allowed() -> None:
    x = torch.randn(8, 4)
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    with pytest.raises(AssertionError, match="could not verify 'w': every probe crossed a kink") as info:
        assert_gradients(_AtTheKink(), loss_fn, x)
    assert not isinstance(info.value, GradientCheckError)
    assert "abs in the model's own forward" in str(info.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: the kink is reported in the Report
        report = assert_gradients(_AtTheKink(), loss_fn, x, allow_unverified=True)
    assert report.tensors["w"].verdict == "kink" and report.tensors["lin.weight"].verdict == "pass"


def test_nonfinite_gradient_raises() -> None:
    model, batch = _tiny()
    model[0].weight.register_hook(lambda g: g * float("nan"))
    with pytest.raises(GradientCheckError, match="'0.weight'"):
        assert_gradients(model, classification_loss, batch)


# ------------------------------------------------------------------ against gradcheck
class _SoftplusScale(torch.autograd.Function):
    """``y = softplus(a·x + b)`` elementwise, hand-written backward (optionally buggy)."""

    @staticmethod
    def forward(ctx, x, a, b, bug):
        z = a * x + b
        ctx.save_for_backward(x, a, z)
        ctx.bug = bug
        return torch.nn.functional.softplus(z)

    @staticmethod
    def backward(ctx, grad):
        x, a, z = ctx.saved_tensors
        dz = grad * torch.sigmoid(z)
        da = dz * x
        if ctx.bug:  # the planted bug: a d(softplus)/dz of exp(z) / (1 + exp(z))**2 (the sigmoid's derivative)
            da = grad * torch.sigmoid(z) * torch.sigmoid(-z) * x
        return dz * a, da, dz, None


class _SoftplusLayer(nn.Module):
    def __init__(self, bug: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.x = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.a = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.bug = bug

    def forward(self):
        return _SoftplusScale.apply(self.x, self.a, self.b, self.bug)


@pytest.mark.parametrize("bug", [False, True])
def test_same_verdict_as_torch_autograd_gradcheck_in_float64(bug: bool) -> None:
    layer = _SoftplusLayer(bug)
    inputs = tuple(p.detach().clone().requires_grad_(True) for p in (layer.x, layer.a, layer.b))
    fn = lambda x, a, b: _SoftplusScale.apply(x, a, b, bug)  # noqa: E731
    gradcheck_ok = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    try:
        assert_gradients(layer, lambda m, w: (m() * w).sum(), weights)
        gradwatch_ok = True
    except GradientCheckError as err:
        gradwatch_ok = False
        assert [t.name for t in err.report.failures] == ["a"]
    assert gradcheck_ok == gradwatch_ok == (not bug)


# ------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grads": "cached"}, "`grads` must be one of 'autograd', 'existing', got 'cached'"),
        ({"grads": 3}, "`grads` must be 'autograd', 'existing' or a mapping name -> Tensor, got 3"),
        ({"coordinates": -1}, "`coordinates` must be a non-negative int, got -1"),
        ({"directions": 1.5}, "`directions` must be a non-negative int, got 1.5"),
        ({"coordinates": 0, "directions": 0}, "`coordinates` \\+ `directions` must be at least 1, got 0 \\+ 0"),
        ({"precision": "double"}, "`precision` must be one of 'float64', 'native', 'auto', got 'double'"),
        ({"seed": -3}, "`seed` must be None or a non-negative int, got -3"),
        ({"kinks": 1}, "`kinks` must be a bool, got 1"),
        ({"kink_resamples": -1}, "`kink_resamples` must be a non-negative int, got -1"),
        ({"near_kink_margin": 0}, "`near_kink_margin` must be a positive finite number, got 0"),
        ({"allow_unverified": "yes"}, "`allow_unverified` must be a bool, got 'yes'"),
        ({"step": -1e-6}, "`step` must be a positive finite number, got -1e-06"),
        ({"names": ["nope"]}, "`names` must name parameters of `model`, got unknown \\['nope'\\]"),
        ({"joint": -1}, "`joint` must be a non-negative int, got -1"),
        ({"thorough": "yes"}, "`thorough` must be a bool, got 'yes'"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, match) -> None:
    model, batch = _tiny()
    with pytest.raises(ValueError, match=match):
        assert_gradients(model, classification_loss, batch, **kwargs)


def test_bad_model_and_loss_fn_and_keyword_only_configuration() -> None:
    model, batch = _tiny()
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got str"):
        assert_gradients("model", classification_loss, batch)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        assert_gradients(model, None, batch)
    with pytest.raises(TypeError, match="`loss_fn` must return a scalar loss Tensor"):
        assert_gradients(model, lambda m, b: 1.0, batch)
    params = inspect.signature(assert_gradients).parameters
    assert [n for n, p in params.items() if p.kind != p.KEYWORD_ONLY] == ["model", "loss_fn", "batch"]
    assert gradwatch.assert_gradients is assert_gradients and "assert_gradients" in gradwatch.__all__

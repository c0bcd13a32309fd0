"""The float64 evaluation's rules (gradwatch/_float64.py): casts kept in float64, random
draws replayed in the native dtype, fused attention dropout recognised."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch._float64 as f64
from gradwatch import capture, check
from gradwatch._evaluation import _Evaluation, _native_loss
from gradwatch._judging import _ROUNDING_FLOOR, _loss_noise
from gradwatch.replay import _LossModule
from zoo import CORRECT, RMSNorm, StochasticDepth, classification_loss


def _evaluation(model: nn.Module, loss_fn, batch, *, kinks: bool = False, how: str = "sequential") -> _Evaluation:
    return _Evaluation(model, loss_fn, batch, capture(model), kinks, "float64", how)


# ---------------------------------------------------------------------------------- casts
class _Casts(nn.Module):
    """Every kind of cast to a lower precision, and an int -> float cast (Llama's rotary)."""

    def __init__(self, low: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.register_buffer("inv_freq", torch.rand(6))
        self.low = low  # round trips through float16 and bfloat16 (which the training gradient feels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        pos = torch.arange(x.shape[0])[:, None].float()  # int -> float32, meets a float64 buffer in float64
        h = h + torch.sin(pos @ self.inv_freq[None, :].float())
        if self.low:
            h = h.half().float().bfloat16().to(torch.float32)
        h = F.softmax(h, -1, dtype=torch.float32)
        h = h * h.sum(-1, keepdim=True, dtype=torch.float32).type_as(x)
        return h + torch.tensor(0.5, dtype=torch.float32)


def test_casts_to_lower_precision_keep_float64() -> None:
    torch.manual_seed(0)
    model = _Casts()
    batch = (torch.randn(5, 6), torch.randint(0, 6, (5,)))
    ev = _evaluation(model, classification_loss, batch)
    loss, _ = ev(ev.shadow)
    assert loss.dtype == torch.float64
    assert ev.lowest_dtype == torch.float64  # nothing below float64 was computed
    kept, sites = ev.kept_casts
    # .half() .float() .bfloat16() .to() softmax(dtype) sum(dtype) torch.tensor(dtype) and .float() of a
    # float64 buffer; the int->float cast of arange is not a precision choice and is not counted
    assert kept >= 8, (kept, sites)
    assert sites[0] == "(model): _to_copy float64->float32"  # inv_freq.float() of the root module
    assert any("float64->float16" in s for s in sites) and len(sites) == f64._SITES

    # without the float16/bfloat16 round trips (whose rounding the float32 training gradient has,
    # and the precision test rightly reports): checked, and passes
    model.low = False
    report = check(model, classification_loss, batch, seed=0)
    assert report.reliable and report.ok, str(report)
    assert report.kept_casts == kept - 4 and report.kept_cast_sites[0] == sites[0]
    assert f"kept float64 through {kept - 4} cast(s)" in str(report)


def test_integer_and_bool_casts_are_untouched() -> None:
    seen = []

    class IntCasts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            seen.append(((h > 0).to(torch.int32).dtype, h.argmax(-1).to(torch.int16).dtype, (h > 0).float().dtype))
            return h

    model = IntCasts()
    ev = _evaluation(model, classification_loss, (torch.randn(4, 4), torch.tensor([0, 1, 2, 0])))
    ev(ev.shadow)
    assert seen[-1] == (torch.int32, torch.int16, torch.float64)
    assert ev.kept_casts[0] == 0  # bool -> float is no precision choice


def test_a_float32_tensor_from_outside_meets_float64() -> None:
    """A float32 table held as a plain attribute (not a buffer: not copied to float64)."""

    class Table(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.table = torch.randn(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) @ self.table

    torch.manual_seed(0)
    report = check(Table(), classification_loss, (torch.randn(6, 4), torch.randint(0, 3, (6,))), seed=0)
    assert report.reliable and report.ok, str(report)
    assert report.precision == "float64"  # not the fallback after "expected m1 and m2 to have the same dtype"


def test_rmsnorm_in_float32_is_computed_in_float64() -> None:
    """Before: the float32 statistics made the error bar grow by 5 orders of magnitude."""
    case = CORRECT["rmsnorm_float32"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    assert report.ok and report.reliable, str(report)
    assert report.kept_cast_sites == ("1: _to_copy float64->float32",)  # .to(input dtype) is float64 already
    # float64 noise, not float32's: before, error bars up to 1.2e-2 and err/tol up to 0.67 on this model
    assert max(t.error_bar for t in report.tensors.values()) < 1e-6
    assert max(t.error_ratio for t in report.tensors.values()) < 0.05


def test_float_loss_is_checked_instead_of_unreliable() -> None:
    case = CORRECT["float_loss"](0)
    report = check(case.model, case.loss_fn, case.batch, seed=0)
    assert report.reliable, report.reason
    assert all(t.verdict == "pass" for t in report.tensors.values()), str(report)
    assert report.kept_cast_sites == ("(model): _to_copy float64->float32",)


def test_a_kernel_that_returns_float32_sets_the_rounding_floor() -> None:
    """An op that computes in float32 whatever its inputs: the evaluation knows, and the
    loss-noise floor is float32's."""

    @torch.library.custom_op("gradwatch_test::to_f32_tanh", mutates_args=())
    def f32_tanh(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.float())

    f32_tanh.register_fake(lambda x: torch.empty_like(x, dtype=torch.float32))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * 0 + f32_tanh(self.fc(x)).to(x.dtype)

    model = Model()
    batch = (torch.randn(4, 4), torch.tensor([0, 1, 2, 0]))
    ev = _evaluation(model, classification_loss, batch)
    loss, _ = ev(ev.shadow)
    assert loss.dtype == torch.float64 and ev.lowest_dtype == torch.float32
    floor = _loss_noise({}, [], ev, float(loss))
    assert floor == pytest.approx(_ROUNDING_FLOOR * float(loss) * torch.finfo(torch.float32).eps)
    assert floor > 1e3 * float(loss) * torch.finfo(torch.float64).eps


def test_plain_model_runs_later_passes_without_the_mode() -> None:
    case = CORRECT["layernorm_gelu"](0)
    ev = _evaluation(case.model, case.loss_fn, case.batch)
    ev(ev.shadow)
    assert ev.ops.needed is False  # nothing to change: no dispatch mode in later passes
    case = CORRECT["stochastic_depth"](0)
    ev = _evaluation(case.model, case.loss_fn, case.batch)
    ev(ev.shadow)
    assert ev.ops.needed is True and ev.ops.draws == 2


# ---------------------------------------------------------------------------- random draws
class _Draws(nn.Module):
    """Every random op, each result kept for comparison."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        keep = self.seen.append
        keep(torch.rand(h.shape, dtype=h.dtype))
        keep(torch.rand(3))  # the default dtype (float64 inside the float64 evaluation)
        keep(torch.randn_like(h))
        keep(torch.randint(0, 5, (4,)))
        keep(torch.randperm(6))
        keep(torch.bernoulli(torch.sigmoid(h)))
        keep(torch.empty_like(h).uniform_(-1, 2))
        keep(torch.empty_like(h).normal_(0.5, 2.0))
        keep(torch.empty_like(h).exponential_())
        keep(torch.empty_like(h).bernoulli_(0.3))
        keep(torch.multinomial(torch.softmax(h[0], -1), 4))
        keep(torch.normal(h.detach(), 1.0) - h.detach())
        d = F.dropout(h, 0.4)
        keep(d != 0)
        keep(F.dropout2d(h[None, :, :, None], 0.5) != 0)
        keep(F.alpha_dropout(h, 0.2))
        r = F.rrelu(h, training=True)
        keep(torch.where(h < 0, r / h, 0))  # the drawn slopes
        p = F.fractional_max_pool2d(h[None, None], 2, output_size=(3, 3), return_indices=True)[1]
        keep(p)
        return (d + r).sum() + p.float().sum() * 0


def test_random_ops_draw_exactly_what_the_native_forward_drew() -> None:
    torch.manual_seed(0)
    model = _Draws()
    batch = torch.randn(6, 8)
    loss_fn = lambda m, b: m(b)  # noqa: E731
    replay = capture(model)
    model.seen.clear()
    native_loss = _native_loss(_LossModule(model, loss_fn), batch, replay, grad=False)
    native = list(model.seen)
    model.seen.clear()
    ev = _Evaluation(model, loss_fn, batch, replay, False, "float64")
    loss, _ = ev(ev.shadow)
    replayed = list(model.seen)
    assert len(native) == len(replayed) == 17
    for i, (a, b) in enumerate(zip(native, replayed)):
        assert b.dtype == (torch.float64 if a.dtype == torch.float32 else a.dtype), i
        # element by element: the same draws (float values up to float32 rounding of h-dependent ones)
        if a.is_floating_point() and i in (11, 14, 15):  # normal(h) - h, alpha_dropout(h), rrelu slopes
            torch.testing.assert_close(b, a.double(), rtol=1e-6, atol=1e-6, msg=f"draw {i}")
        else:
            assert torch.equal(b, a.to(b.dtype)), f"draw {i}"
    assert ev.ops.draws >= 14
    assert float(loss) == pytest.approx(float(native_loss), rel=1e-6)


def test_random_draws_replay_under_the_kink_recorder_and_autograd() -> None:
    """The same rules inside the kink recorder's dispatch level, with the float64 reference backward."""
    for seed in range(3):
        case = CORRECT["stochastic_depth"](seed)
        report = check(case.model, case.loss_fn, case.batch, seed=seed, kinks=True, reference=True)
        assert report.reliable and report.ok and report.reference, str(report)
        assert abs(report.replay_loss - report.train_loss) < 1e-5 * abs(report.train_loss)


def test_stochastic_depth_batched_evaluation() -> None:
    case = CORRECT["stochastic_depth"](1)
    report = check(case.model, case.loss_fn, case.batch, seed=1, kinks=False, evaluation="batched")
    assert report.reliable and report.ok, str(report)
    # vmap (randomness="same") replays the draws, or falls back to sequential evaluation saying why
    assert report.evaluation == "batched" or "evaluated sequentially" in report.evaluation_reason


def test_stochastic_depth_after_training_stays_reliable() -> None:
    """ConvNeXt-style drop path: the masks drawn in float32 must be replayed after training, too."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        StochasticDepth(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GELU()), p=0.5),
        StochasticDepth(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GELU()), p=0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    reports = []
    for step in range(30):
        batch = (torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g))
        if step % 10 == 9:
            reports.append(check(model, classification_loss, batch, seed=step, coordinates=2))
        opt.zero_grad()
        classification_loss(model, batch).backward()
        opt.step()
    assert all(r.reliable and r.ok for r in reports), [r.reason for r in reports]


# ------------------------------------------------------------------------ attention dropout
class _Attention(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 3)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0)
        return self.out(h.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8).mean(1))


def _attention_case():
    torch.manual_seed(0)
    return _Attention(0.3), (torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))


def test_sdpa_dropout_on_the_math_path_is_replayed() -> None:
    """On CPU SDPA's dropout runs the math path in float32 too: the masks are replayed."""
    model, batch = _attention_case()
    assert f64._sdpa_backend({"query": torch.randn(4, 2, 5, 4), "key": torch.randn(4, 2, 5, 4),
                              "value": torch.randn(4, 2, 5, 4), "dropout_p": 0.3}, torch.float32) == 0
    report = check(model, classification_loss, batch, seed=0)
    assert report.reliable and report.ok, str(report)
    assert abs(report.replay_loss - report.train_loss) < 1e-5 * report.train_loss


def test_sdpa_dropout_in_a_fused_kernel_is_unreliable_not_a_false_alarm(monkeypatch) -> None:
    """A fused kernel (flash/memory-efficient on CUDA) draws its own masks; simulated on CPU by
    making PyTorch's backend choice say "flash"."""
    asked = []

    def flash(given, dtype):
        asked.append((given["dropout_p"], dtype))
        return 1

    monkeypatch.setattr(f64, "_sdpa_backend", flash)
    model, batch = _attention_case()
    report = check(model, classification_loss, batch, seed=0)
    assert asked == [(0.3, torch.float32)]  # asked once (first float64 pass), for the native dtype
    assert not report.reliable and report.ok
    assert "scaled_dot_product_attention with dropout_p=0.3 runs flash attention in float32" in report.reason
    assert all(t.verdict == "skipped" for t in report.tensors.values())
    model.eval()  # no dropout: nothing to replay, judged as usual
    report = check(model, classification_loss, batch, seed=0)
    assert report.reliable and report.ok and not asked[1:]


def test_stochastic_depth_under_bf16_autocast_draws_in_the_recorded_dtypes() -> None:
    """Under autocast the drop-path mask is drawn in bfloat16 (the activation's dtype), not in
    the float32 parameter dtype: a native replay records the dtypes (was a false alarm at seed 0)."""
    import gradwatch

    case = CORRECT["stochastic_depth"](0)
    watch = gradwatch.GradWatch(case.model, case.loss_fn, every_n_steps=1, max_overhead=None, seed=0,
                                on_failure=lambda r: None)
    with watch.step(case.batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = case.loss_fn(case.model, case.batch)
        loss.backward()
    report = watch.last_report
    assert report.reliable and report.ok, str(report)
    assert abs(report.replay_loss - report.train_loss) < 1e-3 * report.train_loss  # was 1.3% (other masks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        replay = capture(case.model)
    ev = _Evaluation(case.model, case.loss_fn, case.batch, replay, False, "float64")
    assert ev.ops.native_draws == [torch.bfloat16, torch.bfloat16]

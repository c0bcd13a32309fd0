"""gradwatch on real Triton kernels of our own (``tests/_triton_kernels.py``), run on CPU by
Triton's interpreter: every planted backward bug is caught, no correct kernel raises a false
alarm, a kernel without float64 is checked in its own precision.

Each kernel sits in a small model (``Linear -> kernel -> Linear``) checked three ways:
``gradwatch.check`` (whole model, 20 seeds), ``gradwatch.check_module`` (the kernel alone, 10
seeds) and ``gradwatch.GradWatch`` training (5 seeds). The assertions marked ``xfail(strict=True)``
fail on the engine of issue 22 because of the numerics problems it lists (verdicts in float64
tolerances on kernels that compute in float32 inside, a broken float64 path blamed on the
training gradient, ...); the engine that fixes them turns them into passes, and ``strict``
makes pytest say so, so the marks are removed then.
"""

from __future__ import annotations

import os
import warnings

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # tests/conftest.py sets it where there is no GPU
    pytest.skip("the Triton kernel tests run under Triton's interpreter: TRITON_INTERPRET=1 (set before "
                "triton is imported)", allow_module_level=True)
pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gradwatch  # noqa: E402
from _triton_kernels import KERNELS  # noqa: E402

#: Seeds per assertion: 20 for the whole-model check, fewer for the module-local check and for
#: GradWatch (whose step-0 check is both), to keep this file near 100 s of CPU time: every
#: perturbed loss is a kernel launch in the interpreter (1-6 ms).
SEEDS = {"check": range(20), "module": range(10), "watch": range(5)}


# --------------------------------------------------------------------------- the kernels themselves


def _rms_ref(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _swiglu_ref(x):
    a, b = x.chunk(2, -1)
    return F.silu(a) * b


def _conv_ref(x, w):
    c, k = w.shape
    return F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), w.unsqueeze(1), groups=c)


_REFERENCES = {
    "rmsnorm": _rms_ref,
    "rmsnorm_1e-3": _rms_ref,
    "cross_entropy": lambda logits, target: F.cross_entropy(logits, target, reduction="none"),
    "swiglu": _swiglu_ref,
    "causal_conv": _conv_ref,
    "gelu_no_fp64": lambda x: F.gelu(x, approximate="tanh"),
    "layernorm_bad_fp64": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
}


def _kernel_vs_reference(case, bug: bool, dtype: torch.dtype):
    """Relative errors of the kernel's output and gradients against float64 torch on the same
    inputs, in ``dtype``; the gradient of the output is drawn contiguous in the output's
    shape (for the conv, a non-contiguous ``dy`` for the kernel)."""
    module, inputs = case.module(bug=bug, seed=0)
    module = module.to(dtype)
    ins = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = module(*ins)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaves = [t for t in ins if t.requires_grad] + list(module.parameters())
    got = torch.autograd.grad(out, leaves, g.to(dtype))
    ref_ins = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_params = [p.detach().double().requires_grad_() for p in module.parameters()]
    ref = _REFERENCES[case.name](*ref_ins, *ref_params)
    want = torch.autograd.grad(ref, [t for t in ref_ins if t.requires_grad] + ref_params, g)
    rel = [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, want)]
    return float((out.detach().double() - ref.detach()).norm() / ref.detach().norm()), rel


@pytest.mark.parametrize("name", list(_REFERENCES))
def test_correct_kernels_match_torch_and_planted_bugs_do_not(name) -> None:
    case = KERNELS[name]
    out_err, grad_errs = _kernel_vs_reference(case, False, torch.float32)
    assert out_err < 1e-5 and max(grad_errs) < 1e-5, (out_err, grad_errs)
    out_err, grad_errs = _kernel_vs_reference(case, True, torch.float32)
    assert out_err < 1e-5 and max(grad_errs) > 1e-2, (out_err, grad_errs)  # the bug is in the backward only


def test_kernels_compute_in_float32_inside_on_float64_inputs() -> None:
    """What gradwatch faces: float64 in, float64 out, float32 accuracy; one kernel raises, one
    is wrong in float64 only."""
    case = KERNELS["swiglu"]
    out_err, grad_errs = _kernel_vs_reference(case, False, torch.float64)
    assert 1e-9 < out_err < 1e-5 and max(grad_errs) < 1e-5, (out_err, grad_errs)
    with pytest.raises(TypeError, match="float64"):
        _kernel_vs_reference(KERNELS["gelu_no_fp64"], False, torch.float64)
    out_err, grad_errs = _kernel_vs_reference(KERNELS["layernorm_bad_fp64"], False, torch.float64)
    assert out_err < 1e-5 and min(grad_errs) > 0.1, (out_err, grad_errs)


# --------------------------------------------------------------------------- gradwatch on them

_F32 = ("issue 22: the kernel computes in float32 inside but is judged with float64 tolerances "
        "(the check does not measure the precision its evaluations really have)")
_FALSE_ALARM = _F32 + ": a correct kernel fails"
_MISSED = _F32 + ": float32 noise hides a planted bug of a few percent, which passes instead of failing or " \
                 "being reported inconclusive"
_NATIVE_MISSED = ("issue 22: the kernel has no float64, the native-precision check misses a 2% bug (passes "
                  "instead of failing or being reported inconclusive)")
_BROKEN_F64 = ("issue 22 item 5: the kernel's float64 backward is wrong, and the training gradient, which "
               "agrees with the central differences, is blamed")

#: (kernel, version, mode) assertions that fail on the engine of issue 22 (main at 0.2.0, measured
#: with this file): the first wrong seed is in the test's assertion message.
_XFAIL: dict[tuple[str, str, str], str] = {
    ("rmsnorm", "correct", "watch"): _FALSE_ALARM,  # seed 1: 'inp.weight' rel_err 0.013, tolerance 0.010
    ("rmsnorm", "correct", "module"): _FALSE_ALARM,  # seed 0: 'input[0]' direction autograd 40, numerical 8
    ("rmsnorm", "bug", "check"): _MISSED,  # seeds 0, 10 of 20
    ("rmsnorm", "bug", "module"): _MISSED,  # seeds 2, 9 of 10
    ("rmsnorm_1e-3", "correct", "module"): _FALSE_ALARM + " (inputs of scale 1e-3)",  # seed 2
    ("rmsnorm_1e-3", "bug", "check"): _MISSED,  # seeds 0, 6, 18 of 20
    ("cross_entropy", "bug", "check"): _MISSED,  # 6 of 20 seeds
    ("cross_entropy", "bug", "watch"): _MISSED,  # seeds 1, 2 of 5
    ("cross_entropy", "bug", "module"): _MISSED,  # 6 of 10 seeds
    ("swiglu", "correct", "module"): _FALSE_ALARM,  # seed 1
    ("causal_conv", "correct", "watch"): _FALSE_ALARM,  # seed 4: 'kernel::input[0]'
    ("causal_conv", "correct", "module"): _FALSE_ALARM,  # seed 8: rel_err 5.5e-4 over a tolerance below the noise
    ("gelu_no_fp64", "bug", "check"): _NATIVE_MISSED,  # seeds 2, 8, 16 of 20
    ("layernorm_bad_fp64", "correct", "check"): _BROKEN_F64,  # every seed
    ("layernorm_bad_fp64", "correct", "watch"): _BROKEN_F64,
    ("layernorm_bad_fp64", "correct", "module"): _BROKEN_F64,
}


def _reports(case, bug: bool, mode: str, seed: int) -> list:
    if mode == "module":
        module, inputs = case.module(bug=bug, seed=seed)
        return [gradwatch.check_module(module, inputs, seed=seed)]
    model = case.model(bug=bug, seed=seed)
    if mode == "check":
        return [gradwatch.check(model, case.loss_fn, case.batch(seed), seed=seed)]
    # one full check at step 0 (the plain schedule, not the time budget: the same probes on any machine)
    watch = gradwatch.GradWatch(model, case.loss_fn, every_n_steps=2, max_overhead=None, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientCheckWarning)
        for step in range(2):
            batch = case.batch(1000 * seed + step)
            opt.zero_grad()
            with watch.step(batch):
                case.loss_fn(model, batch).backward()
            opt.step()
    assert [s for s, _ in watch.reports] == [0]
    return [r for _, r in watch.reports]


def _cases():
    names = ("rmsnorm", "rmsnorm_1e-3", "cross_entropy", "swiglu", "causal_conv", "gelu_no_fp64",
             "layernorm_bad_fp64")
    for name in names:
        for version in ("correct", "bug"):
            for mode in ("check", "watch", "module"):
                reason = _XFAIL.get((name, version, mode))
                marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)] if reason else []
                yield pytest.param(name, version, mode, marks=marks, id=f"{name}-{version}-{mode}")


@pytest.mark.parametrize(("name", "version", "mode"), list(_cases()))
def test_planted_bugs_are_caught_and_correct_kernels_pass(name, version, mode) -> None:
    case = KERNELS[name]
    for seed in SEEDS[mode]:  # stops at the first wrong seed: benchmarks/triton_kernels.py counts them all
        reports = _reports(case, version == "bug", mode, seed)
        failed = [t for r in reports for t in r.tensors.values() if t.verdict == "fail"]
        if version == "bug":
            assert failed, (seed, "missed", {k: t.verdict for r in reports for k, t in r.tensors.items()})
        else:
            assert not failed and all(r.ok for r in reports), (seed, "false alarm", [t.message for t in failed][:2])


def test_kernel_without_float64_is_checked_in_its_own_precision() -> None:
    """The kernel raises on float64: gradwatch falls back to the model's precision, judges the
    tensors (not all skipped) and does not crash, whole-model and module-local."""
    case = KERNELS["gelu_no_fp64"]
    for seed in range(3):
        report = gradwatch.check(case.model(seed=seed), case.loss_fn, case.batch(seed), seed=seed)
        assert report.precision == "native" and report.reliable, report
        assert report.tensors["inp.weight"].verdict == "pass", report  # the one trained tensor (the head is frozen)
        module, inputs = case.module(seed=seed)
        local = gradwatch.check_module(module, inputs, seed=seed)
        assert local.precision == "native" and local.ok and local.tensors["input[0]"].verdict == "pass", local

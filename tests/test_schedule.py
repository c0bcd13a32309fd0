"""The overhead-budget schedule shared by the adapters, on a simulated clock."""

from __future__ import annotations

import types

import pytest

from gradwatch import _schedule
from gradwatch._schedule import (
    _EVALS_PER_PROBE,
    _EVALS_PER_SHORT_PROBE,
    _FIXED_EVALS,
    _FIXED_EVALS_SMALLEST,
    _JOINT_PROBES,
    _Schedule,
)

NAMES = [f"layer{i}.weight" for i in range(6)]


def _simulate(monkeypatch, *, steps, every, budget, step_s, eval_s, coordinates=4, directions=1):
    """Train ``steps`` steps of ``step_s`` seconds; a check costs ``eval_s`` per loss evaluation."""
    now = [0.0]
    monkeypatch.setattr(_schedule, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    sched = _Schedule(every, budget, coordinates, directions)
    checks, check_s = [], 0.0
    for step in range(steps):
        due = sched.begin(step)
        now[0] += step_s
        if due:
            chosen, c, d = sched.plan(NAMES)
            probes = len(chosen) * (c + d)  # besides the joint probe every check starts with
            if sched.richardson:
                cost = eval_s * (_FIXED_EVALS + _EVALS_PER_PROBE * (probes + _JOINT_PROBES))
            else:
                cost = eval_s * (_FIXED_EVALS_SMALLEST + _EVALS_PER_SHORT_PROBE * (probes + _JOINT_PROBES))
            now[0] += cost
            check_s += cost
            sched.done(step, cost, probes)
            checks.append((step, chosen, c, d))
    return checks, check_s, steps * step_s


def test_without_budget_checks_everything_every_n_steps(monkeypatch) -> None:
    checks, _, _ = _simulate(monkeypatch, steps=35, every=10, budget=None, step_s=1.0, eval_s=100.0)
    assert [c[0] for c in checks] == [0, 10, 20, 30]
    assert all(chosen == NAMES and (c, d) == (4, 1) for _, chosen, c, d in checks)


def test_cheap_checks_run_in_full_every_n_steps(monkeypatch) -> None:
    # a full check: 2 + 4*30 = 122 evaluations of 1e-4 s = 0.0122 s; 10 steps of 1 s allow 0.2 s
    checks, spent, trained = _simulate(monkeypatch, steps=100, every=10, budget=0.02, step_s=1.0, eval_s=1e-4)
    assert [c[0] for c in checks] == list(range(0, 100, 10))
    assert all(chosen == NAMES and (c, d) == (4, 1) for _, chosen, c, d in checks[1:])
    assert spent <= 0.02 * trained


@pytest.mark.parametrize("eval_s", [0.05, 0.3, 1.0, 5.0])
def test_expensive_checks_stay_within_the_budget(monkeypatch, eval_s) -> None:
    checks, spent, trained = _simulate(monkeypatch, steps=20_000, every=100, budget=0.02, step_s=1.0, eval_s=eval_s)
    assert checks[0][0] == 0  # the first check is never deferred
    largest = eval_s * (_FIXED_EVALS + _EVALS_PER_PROBE * 31)
    assert spent <= 0.02 * trained + largest, (spent, trained)
    assert spent >= 0.01 * trained  # the budget is used, not wasted
    gaps = [b[0] - a[0] for a, b in zip(checks, checks[1:])]
    assert min(gaps) >= 100


def test_probes_shrink_coordinates_first_then_to_the_joint_probe_alone(monkeypatch) -> None:
    # 0.02 * 100 steps * 1 s = 2 s per interval: 2 / 0.01 = 200 evaluations, enough for the joint probe + 6 x 5
    full, _, _ = _simulate(monkeypatch, steps=400, every=100, budget=0.02, step_s=1.0, eval_s=0.01)
    assert all((c, d) == (4, 1) and chosen == NAMES for _, chosen, c, d in full[1:])
    # 2 s / 0.05 = 40 evaluations: the joint probe + 8 probes, fewer coordinates on every tensor
    fewer, _, _ = _simulate(monkeypatch, steps=400, every=100, budget=0.02, step_s=1.0, eval_s=0.05)
    assert all(chosen == NAMES and d == 1 and c < 4 for _, chosen, c, d in fewer[1:])
    # 2 s / 0.2 = 10 evaluations: the joint probe alone, over every tensor (no rotation needed)
    joint, _, _ = _simulate(monkeypatch, steps=3000, every=100, budget=0.02, step_s=1.0, eval_s=0.2)
    assert all(chosen == NAMES and c == 0 and d <= 1 for _, chosen, c, d in joint)
    assert sum((c, d) == (0, 0) for _, _, c, d in joint) >= len(joint) - 3  # a direction each when credit piled up
    assert len(joint) >= 20  # every ~100-150 steps


def test_every_check_covers_every_tensor_even_the_first_and_the_smallest(monkeypatch) -> None:
    sched = _Schedule(100, 0.02, 4, 1)
    now = [0.0]
    monkeypatch.setattr(_schedule, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    sched.begin(0)
    now[0] += 1.0
    # 2 evaluations < 4 + 4: the smallest check, the joint probe over every tensor at ±h
    assert sched.plan(NAMES) == (NAMES, 0, 0) and not sched.richardson
    roomy = _Schedule(100, 0.2, 4, 1)
    roomy.begin(0)
    now[0] += 1.0
    assert roomy.plan(NAMES) == (NAMES, 0, 0) and roomy.richardson  # 20 evaluations: the joint probe in full
    roomier = _Schedule(100, 0.5, 4, 1)
    roomier.begin(0)
    now[0] += 1.0
    assert roomier.plan(NAMES) == (NAMES, 0, 1) and roomier.richardson  # 50: joint + a direction per tensor
    assert _Schedule(100, None, 4, 1).plan(NAMES) == (NAMES, 4, 1)
    # what the planned check overrides: nothing, or for the smallest check the ±2h passes,
    # and the redrawing of kinked coordinates (it keeps the float64 reference gradient)
    assert roomy.check_options() == {}
    assert sched.check_options() == {"richardson": False, "kink_resamples": 0}


def test_first_check_gets_one_interval_of_budget(monkeypatch) -> None:
    # before any check, one evaluation is assumed to cost one training step: 0.02 * 100 = 2 evaluations
    checks, _, _ = _simulate(monkeypatch, steps=1, every=100, budget=0.02, step_s=1.0, eval_s=1.0)
    assert checks == [(0, NAMES, 0, 0)]  # the smallest check: the joint probe alone
    checks, _, _ = _simulate(monkeypatch, steps=1, every=100, budget=1.0, step_s=1.0, eval_s=1.0)
    assert checks == [(0, NAMES, 2, 1)]  # 100 evaluations: the joint probe + 23 probes, 3 per tensor


def test_is_planned() -> None:
    fixed = _Schedule(4, None, 4, 1)
    assert [fixed.is_planned(s) for s in range(6)] == [True, False, False, False, True, False]
    budget = _Schedule(4, 0.02, 4, 1)
    assert [budget.is_planned(s) for s in range(3)] == [True, False, False]
    with pytest.raises(ValueError, match="`step` must be a non-negative int, got -1"):
        budget.is_planned(-1)


def test_time_added_after_a_check_counts_as_checking_not_training(monkeypatch) -> None:
    """Module-local checks run after the whole-model check (``done``) and report their time with
    ``add``: it goes to the budget, defers the next check, and is not counted as training."""
    now = [0.0]
    monkeypatch.setattr(_schedule, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    sched = _Schedule(10, 0.02, 4, 1)
    assert sched.begin(0)
    now[0] += 1.0  # the training step
    sched.plan(NAMES)
    now[0] += 0.01
    sched.done(0, 0.01, 0)
    planned = sched.next_step
    now[0] += 5.0  # module-local checks
    sched.add(0, 5.0)
    assert sched.check_seconds == pytest.approx(5.01)
    assert sched.next_step > planned  # 5 s at 2% of ~1 s steps: the next check waits longer
    for step in range(1, 4):
        sched.begin(step)
        now[0] += 1.0
    sched.begin(4)
    assert sched.train_seconds == pytest.approx(4.0)  # the 5 s of local checks are not training time

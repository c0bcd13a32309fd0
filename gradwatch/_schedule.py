"""When to check and how much to probe, within an overhead budget (private).

One small class shared by the adapters (:class:`gradwatch.GradWatch` and the Lightning
callback). The adapter calls :meth:`_Schedule.begin` at the start of every training
step (the hot path: one ``time.perf_counter()`` call and a few float operations, no
tensor work), :meth:`_Schedule.plan` when a check step's gradient is ready, and
:meth:`_Schedule.done` after the check.

Budget accounting (``max_overhead`` = check seconds / training seconds):

* Training time is the wall time between consecutive step starts, minus the checks in
  between. On CUDA this needs no synchronisation: the CPU runs ahead of the device by
  a bounded queue only, so over many steps the wall time per step is the device's
  time per step. A check synchronises once (its results come to the host), which
  drains that queue; the drained work is counted as check time, so the estimate
  errs on the side of checking less.
* A check may start when the check seconds spent so far plus the predicted cost of
  the smallest check (one probe of one tensor) fit in ``max_overhead`` times the
  training seconds so far, and at least ``every_n_steps`` steps have passed. The
  first check always runs, at step 0.
* Every check starts with a joint probe (``check(joint=1)``, :mod:`gradwatch._joint`):
  one random direction over every tensor at once, so every check covers the whole
  model, the first one (step 0) included. The check then spends what the budget
  holds on probes of each tensor: the configured coordinates and directions on
  every tensor when that fits; otherwise fewer coordinates, then fewer directions
  (at least one probe per tensor); when not even one probe per tensor fits, the
  joint probe alone (``coordinates=directions=0``). When not even the joint probe
  with its ``±2h`` Richardson passes fits, the check is the smallest one: the joint
  probe at ``±h`` only (:attr:`_Schedule.richardson` is False;
  :meth:`_Schedule.check_options`). It keeps the float64 reference gradient (one
  float64 backward): judged against it, a joint probe over 8-27 tensors caught a 2%
  error on 1/8 of one weight's rows in 20/20 seeds (err/tol 2.8-6000), against the
  float32 gradient alone in 5-15/20 (``benchmarks/time_to_detect.py``). A probe
  that crosses a kink is redone at a smaller step, so it still verifies something on
  ReLU/max-pool networks. Costs are predicted from the seconds per loss evaluation
  measured at the previous check (before the first check: the duration of the
  training step itself).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

from gradwatch._validate import _non_negative_int

__all__: list[str] = []

#: Loss evaluations per check besides the probes, roughly: the native replay, the unperturbed
#: float64 loss and its backward (the float64 reference gradient), in the smallest check too.
#: Only an estimate: the seconds per evaluation are re-measured at every check.
_FIXED_EVALS = 4
_FIXED_EVALS_SMALLEST = 4
#: Loss evaluations per probe (θ ± h·v and θ ± 2h·v), and without the ±2h passes.
_EVALS_PER_PROBE = 4
_EVALS_PER_SHORT_PROBE = 2
#: Joint probes per check (``check``'s default ``joint=1``): one direction over every tensor.
_JOINT_PROBES = 1


class _Schedule:
    """Decides the check steps and the probes per check (see the module docstring)."""

    def __init__(self, every_n_steps: int, max_overhead: float | None, coordinates: int, directions: int) -> None:
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.coordinates = coordinates
        self.directions = directions
        self.next_step = 0  # no check before this step
        self.checks = 0
        self.train_seconds = 0.0
        self.train_steps = 0
        self.check_seconds = 0.0
        self.seconds_per_eval: float | None = None
        self._mark: float | None = None  # perf_counter at the start of the running step
        self.richardson = True  # whether the planned check's probes take the ±2h passes

    # --------------------------------------------------------------------- hot path
    def begin(self, step: int, *, defer: bool = True) -> bool:
        """Start of training step ``step``: whether it is checked. No tensor work.

        ``defer=False`` decides from :attr:`next_step` alone (set by :meth:`done`), so
        that processes which share ``next_step`` take the same decision without
        comparing their clocks (data-parallel training).
        """
        now = time.perf_counter()
        if self._mark is not None:
            self.train_seconds += now - self._mark
            self.train_steps += 1
        self._mark = now
        if step < self.next_step:
            return False
        wait = self._steps_to_afford() if self.checks and defer else 0
        if wait:
            self.next_step = step + wait
            return False
        self.next_step = step + self.every_n_steps  # also when the step raises before its check
        return True

    # ------------------------------------------------------------------ check steps
    def plan(self, names: Sequence[str]) -> tuple[list[str], int, int]:
        """The tensors, coordinates and directions of the check about to run.

        Also closes the timing of the training step that is being checked.
        """
        self.end_step()
        names = list(names)
        per_tensor = self.coordinates + self.directions
        self.richardson = True
        if self.max_overhead is None or not names:
            return names, self.coordinates, self.directions
        per_eval = self._seconds_per_eval()
        if self.checks == 0:  # nothing spent yet: one interval's share of the budget
            available = self.max_overhead * self.every_n_steps * self._step_seconds()
        else:
            available = self._credit()
        # the joint probe comes first: one probe over every tensor
        probes = int(max(available / per_eval - _FIXED_EVALS, 0) // _EVALS_PER_PROBE) - _JOINT_PROBES
        if probes >= per_tensor * len(names):
            return names, self.coordinates, self.directions
        if probes >= len(names):  # every tensor, fewer probes each: coordinates go first
            each = probes // len(names)
            directions = min(self.directions, each)
            return names, min(self.coordinates, each - directions), directions
        # the joint probe alone; at ±h only, without the reference, when not even it fits in full
        self.richardson = probes >= 0
        return names, 0, 0

    def end_step(self) -> None:
        """Close the timing of the training step being checked: what runs from now on is checking
        (idempotent; :meth:`plan` calls it too)."""
        if self._mark is not None:
            self.train_seconds += time.perf_counter() - self._mark
            self.train_steps += 1
            self._mark = None

    def check_options(self) -> dict[str, bool | int]:
        """Keyword arguments of ``check`` that the planned check overrides: the smallest
        check (the joint probe alone) takes no ``±2h`` passes and redraws no coordinate
        that crossed a kink; it keeps the float64 reference gradient."""
        if self.richardson:
            return {}
        return {"richardson": False, "kink_resamples": 0}

    def done(self, step: int, seconds: float, probes: int) -> None:
        """After the check of ``step``: it took ``seconds`` for ``probes`` probes of
        single tensors (besides its joint probe)."""
        self.checks += 1
        self.check_seconds += seconds
        if self.richardson:
            evals = _FIXED_EVALS + _EVALS_PER_PROBE * (probes + _JOINT_PROBES)
        else:
            evals = _FIXED_EVALS_SMALLEST + _EVALS_PER_SHORT_PROBE * (probes + _JOINT_PROBES)
        self.seconds_per_eval = seconds / evals
        self.next_step = step + max(self.every_n_steps, self._steps_to_afford())
        self._mark = time.perf_counter()

    def add(self, step: int, seconds: float) -> None:
        """After :meth:`done`: ``seconds`` more spent checking ``step`` (module-local checks)
        count against the budget, and training time is measured from now."""
        self.check_seconds += seconds
        self.next_step = step + max(self.every_n_steps, self._steps_to_afford())
        self._mark = time.perf_counter()

    def is_planned(self, step: int) -> bool:
        """Whether ``step`` is a check step as planned now (the budget may defer it)."""
        _non_negative_int("step", step)
        if self.max_overhead is None:
            return step % self.every_n_steps == 0
        return step == self.next_step

    # -------------------------------------------------------------------- estimates
    def _steps_to_afford(self) -> int:
        """Training steps until the budget holds the smallest check (0: it does now)."""
        if self.max_overhead is None:
            return 0
        missing = self._smallest_cost() - self._credit()
        per_step = self.max_overhead * self._step_seconds()
        if missing <= 0 or per_step <= 0:
            return 0
        return math.ceil(missing / per_step)

    def _credit(self) -> float:
        return self.max_overhead * self.train_seconds - self.check_seconds

    def _step_seconds(self) -> float:
        return self.train_seconds / max(self.train_steps, 1)

    def _seconds_per_eval(self) -> float:
        if self.seconds_per_eval is not None:
            return self.seconds_per_eval
        return max(self._step_seconds(), 1e-6)  # a float64 forward costs about a training step

    def _smallest_cost(self) -> float:
        return (_FIXED_EVALS_SMALLEST + _EVALS_PER_SHORT_PROBE) * self._seconds_per_eval()

"""The ``gradwatch`` command: read gradwatch's TensorBoard logs, run the demo.

``gradwatch report LOGDIR`` reads every TensorBoard run under ``LOGDIR`` (each directory
holding event files, searched recursively, every scalar point kept), finds the keys
:func:`gradwatch.metrics` logged under ``--prefix`` and prints one table per run: per
tensor the checks, failing checks, first failing step (``<prefix>/failed/<param>``),
worst relative error and worst error/tolerance with their steps, and the kink crossings
(sum of ``<prefix>/kinks/<param>``), the tensors with the largest error/tolerance at the
run's last check (``<prefix>/worst/<k>``, named by the ``error_ratio`` of that step), then
the run's checks and failing checks, and the capsule of each failing tensor (``gradwatch repro``
reruns it; read from the ``<prefix>/capsules`` text the TensorBoard sink writes); ``--top N`` keeps the
table to the N tensors with the
largest worst error/tolerance (failing tensors always shown), for models with hundreds of
tensors. Module-local tensors (``<module>::<tensor>``) have rows like any tensor; comparisons
with a registered reference have a row ``<module>::<quantity> (reference)`` (``rel_error``
there is ``<prefix>/reference_rel_diff``, error/tolerance ``<prefix>/reference_error_ratio``,
failing checks ``<prefix>/reference_failed``). The exit
status gates CI: 0 when no check failed, 1 when a check failed (a ``<prefix>/failures`` or
``<prefix>/reference_failures`` point above 0), 2 on a usage error, a missing ``LOGDIR`` or one without gradwatch scalars.
``--plot out.png`` (needs matplotlib: ``pip install 'gradwatch[plot]'``) draws relative
error and error/tolerance over the steps per tensor, log scale, with the fail threshold.

``gradwatch demo`` trains the planted-bug model of :mod:`gradwatch.demo`.

``--json`` prints one object (values that were never logged are ``null``)::

    {"logdir": str, "prefix": str,
     "failed": bool,                 # any check of any run failed (exit status 1)
     "checks": int, "failing_checks": int,          # over all runs
     "runs": [{"run": str,           # directory relative to LOGDIR ("." for LOGDIR itself)
               "path": str,          # the directory as found under LOGDIR
               "checks": int,        # points of <prefix>/failures, one per check
               "failing_checks": int, "first_failing_step": int | null,
               "steps": [int],       # the checked steps
               "fail_threshold": float,   # <prefix>/fail_threshold (error/tolerance above it fails)
               "duplicate_steps": int,    # steps logged more than once (the last point is kept)
               "worst_step": int | null,  # the last check with <prefix>/worst/<k> points
               "worst": [{"tensor": str | null,    # rank k at worst_step: <prefix>/worst/<k>, named by the
                          "error_ratio": float}],  # tensor whose error_ratio matches (null: none logged)
               "tensors": [{"tensor": str,    # named_parameters() name or <module>::<tensor>, in logging order,
                                              # then "<module>::<quantity> (reference)" comparisons
                            "checks": int,    # checks that judged or kinked this tensor
                            "failing_checks": int, "first_failing_step": int | null,
                            "worst_rel_error": float | null, "worst_rel_error_step": int | null,
                            "worst_error_ratio": float | null, "worst_error_ratio_step": int | null,
                            "kinks": int,     # probes that crossed a kink, all checks
                            "capsule": str | null}]}]}   # its capsule file (<prefix>/capsules text), if any

Example:
    >>> main(["report", "runs"])  # doctest: +SKIP
    run planted_bug: 6 checks, 6 failing (first at step 0)
    ...
    >>> [r.failing_checks for r in summarize("runs")]  # doctest: +SKIP
    [6]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

from gradwatch import demo
from gradwatch._validate import _argparse_type, _positive_int
from gradwatch.report import _check_prefix, _fmt

__all__ = ["RunSummary", "TensorSummary", "main", "summarize"]

# The scalars read here, as gradwatch.report.metrics (the one key scheme) names them;
# tests/test_cli.py checks that metrics() writes every one of them.
_FAILURES = "failures"  # <prefix>/failures: one point per check
_FAIL_THRESHOLD = "fail_threshold"
_FAILED, _REL_ERROR, _ERROR_RATIO, _KINKS = "failed", "rel_error", "error_ratio", "kinks"  # <prefix>/<kind>/<param>
_WORST = "worst"  # <prefix>/worst/<k>: error_ratio of the k-th worst tensor
# module-local comparisons with a registered reference: <prefix>/<kind>/<module>::<quantity>, and a count per check
_REF_FAILED, _REF_REL_DIFF, _REF_ERROR_RATIO = "reference_failed", "reference_rel_diff", "reference_error_ratio"
_REF_FAILURES = "reference_failures"
_CAPSULES = "capsules"  # <prefix>/capsules: a text naming each failing tensor's capsule (Report.capsule_markdown)
_WORST_SHOWN = 5  # ranks on the table's "worst at the last check" line (--json has all)

_PLOT_MISSING = "`--plot` needs matplotlib: pip install 'gradwatch[plot]'"

_Series = tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class TensorSummary:
    """One tensor over the checks of one run.

    Attributes:
        name: The ``named_parameters()`` name.
        checks: Checks that judged this tensor (points of ``<prefix>/failed/<name>``;
            skipped tensors log nothing).
        failing_steps: Steps at which its verdict was "fail".
        rel_error: ``(step, rel_error)`` points (checks with a judged probe).
        error_ratio: ``(step, error / tolerance)`` points; above the run's
            ``fail_threshold`` the tensor failed.
        kinks: Probes that crossed a kink, summed over the checks.
        capsule: The capsule file the last check naming one gave this tensor (``gradwatch
            repro CAPSULE`` reruns it), or None.
    """

    name: str
    checks: int
    failing_steps: tuple[int, ...]
    rel_error: _Series
    error_ratio: _Series
    kinks: int
    capsule: str | None = None

    @property
    def first_failing_step(self) -> int | None:
        return self.failing_steps[0] if self.failing_steps else None

    @property
    def worst_rel_error(self) -> tuple[int, float] | None:
        """``(step, value)`` of the largest relative error, None if never judged."""
        return max(self.rel_error, key=lambda p: p[1], default=None)

    @property
    def worst_error_ratio(self) -> tuple[int, float] | None:
        """``(step, value)`` of the largest error / tolerance, None if never judged."""
        return max(self.error_ratio, key=lambda p: p[1], default=None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see the module docstring)."""
        rel, ratio = self.worst_rel_error, self.worst_error_ratio
        return {
            "tensor": self.name,
            "checks": self.checks,
            "failing_checks": len(self.failing_steps),
            "first_failing_step": self.first_failing_step,
            "worst_rel_error": None if rel is None else rel[1],
            "worst_rel_error_step": None if rel is None else rel[0],
            "worst_error_ratio": None if ratio is None else ratio[1],
            "worst_error_ratio_step": None if ratio is None else ratio[0],
            "kinks": self.kinks,
            "capsule": self.capsule,
        }


@dataclass(frozen=True)
class RunSummary:
    """The gradwatch scalars of one TensorBoard run (one directory of event files).

    Attributes:
        run: The directory relative to ``LOGDIR`` (``"."`` for ``LOGDIR`` itself).
        path: The directory.
        steps: The checked steps (points of ``<prefix>/failures``).
        failing_steps: Steps whose check had a failing tensor.
        fail_threshold: The logged ``<prefix>/fail_threshold`` (1.0).
        tensors: One summary per tensor, in logging (``named_parameters()``) order.
        duplicate_steps: Steps logged more than once, e.g. two trainings written to
            the same directory; the last point of each step is kept.
        worst_step: The last step with ``<prefix>/worst/<k>`` points, or None.
        worst: ``(tensor, error_ratio)`` by rank at ``worst_step``: the points of
            ``<prefix>/worst/<k>``, each named by a tensor whose ``error_ratio`` point of
            that step has the same value (None when none has).
    """

    run: str
    path: str
    steps: tuple[int, ...]
    failing_steps: tuple[int, ...]
    fail_threshold: float
    tensors: tuple[TensorSummary, ...]
    duplicate_steps: int = 0
    worst_step: int | None = None
    worst: tuple[tuple[str | None, float], ...] = ()

    @property
    def failed(self) -> bool:
        return bool(self.failing_steps)

    @property
    def first_failing_step(self) -> int | None:
        return self.failing_steps[0] if self.failing_steps else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (see the module docstring)."""
        return {
            "run": self.run,
            "path": self.path,
            "checks": len(self.steps),
            "failing_checks": len(self.failing_steps),
            "first_failing_step": self.first_failing_step,
            "steps": list(self.steps),
            "fail_threshold": self.fail_threshold,
            "duplicate_steps": self.duplicate_steps,
            "worst_step": self.worst_step,
            "worst": [{"tensor": name, "error_ratio": value} for name, value in self.worst],
            "tensors": [t.to_dict() for t in self.tensors],
        }


def summarize(logdir: str | os.PathLike[str], *, prefix: str = "gradwatch") -> list[RunSummary]:
    """Read the gradwatch scalars of every TensorBoard run under ``logdir``.

    Args:
        logdir: A directory; every directory below it (itself included) that holds
            event files is a run.
        prefix: The key prefix the run was logged with.

    Returns:
        One :class:`RunSummary` per run holding ``<prefix>/failures``, sorted by directory.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        NotADirectoryError: ``logdir`` is not a directory.
        ValueError: No run under ``logdir`` holds gradwatch scalars with this prefix.

    Example:
        >>> runs = summarize("runs/planted_bug")  # doctest: +SKIP
        >>> runs[0].tensors[0].name, runs[0].tensors[0].first_failing_step  # doctest: +SKIP
        ('0.weight', None)
    """
    if not isinstance(logdir, (str, os.PathLike)):
        raise TypeError(f"`logdir` must be a str or os.PathLike, got {type(logdir).__name__} {logdir!r}")
    _check_prefix(prefix)
    logdir = os.fspath(logdir)
    if not logdir:
        raise ValueError(f"`logdir` must be a non-empty path, got {logdir!r}")
    if not os.path.exists(logdir):
        raise FileNotFoundError(f"`logdir` {logdir!r} does not exist")
    if not os.path.isdir(logdir):
        raise NotADirectoryError(f"`logdir` {logdir!r} is not a directory")

    from tensorboard.backend.event_processing import event_accumulator, io_wrapper

    # 0 = keep every point of that kind; the other kinds are not read
    # (tensors: the texts, every one kept for the capsules; histograms, images, audio: not read)
    guidance = {event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0, event_accumulator.HISTOGRAMS: 1,
                event_accumulator.COMPRESSED_HISTOGRAMS: 1, event_accumulator.IMAGES: 1, event_accumulator.AUDIO: 1}
    runs, other_prefixes, event_dirs = [], set(), 0
    for path in sorted(io_wrapper.GetLogdirSubdirectories(logdir)):
        event_dirs += 1
        accumulator = event_accumulator.EventAccumulator(path, size_guidance=guidance)
        accumulator.Reload()
        tags = accumulator.Tags()["scalars"]
        if f"{prefix}/{_FAILURES}" not in tags:
            other_prefixes.update(t[: -len(_FAILURES) - 1] for t in tags if t.endswith(f"/{_FAILURES}"))
            continue
        run = _run_summary(accumulator, tags, os.path.relpath(path, logdir), path, prefix)
        runs.append(_with_capsules(run, accumulator, prefix))
    if not runs:
        found = "no event files" if not event_dirs else (
            f"{event_dirs} director{'y' if event_dirs == 1 else 'ies'} with event files")
        hint = "".join(f"; found prefix {p!r} (try --prefix {p})" for p in sorted(other_prefixes))
        raise ValueError(f"no gradwatch scalars ('{prefix}/{_FAILURES}') under {logdir!r}: {found}{hint}")
    return runs


def _run_summary(accumulator: Any, tags: Sequence[str], run: str, path: str, prefix: str) -> RunSummary:
    logged = set(tags)

    def series(tag: str) -> _Series:
        """``(step, value)`` points of a scalar tag (none if never logged), one per step: a
        later point of a step (by wall time, then file order) replaces an earlier one. Event
        files are read in name order, which is not the order they were written in (a writer's
        counter going from 9 to 10 sorts first), so the wall time decides."""
        events = sorted(accumulator.Scalars(tag), key=lambda e: e.wall_time) if tag in logged else []
        points = {event.step: event.value for event in events}
        return tuple(sorted(points.items()))

    failures = series(f"{prefix}/{_FAILURES}")
    threshold = series(f"{prefix}/{_FAIL_THRESHOLD}")
    failed_tag = f"{prefix}/{_FAILED}/"
    # Tags() lists tags in the order they were first logged: the model's parameter order
    names = [tag[len(failed_tag):] for tag in tags if tag.startswith(failed_tag)]
    tensors = []
    for name in names:
        failed = series(f"{failed_tag}{name}")
        tensors.append(TensorSummary(
            name=name,
            checks=len(failed),
            failing_steps=tuple(step for step, value in failed if value > 0),
            rel_error=series(f"{prefix}/{_REL_ERROR}/{name}"),
            error_ratio=series(f"{prefix}/{_ERROR_RATIO}/{name}"),
            kinks=round(sum(value for _, value in series(f"{prefix}/{_KINKS}/{name}"))),
        ))
    ref_tag = f"{prefix}/{_REF_FAILED}/"
    for name in [tag[len(ref_tag):] for tag in tags if tag.startswith(ref_tag)]:  # a row per reference comparison
        failed = series(f"{ref_tag}{name}")
        tensors.append(TensorSummary(
            name=f"{name} (reference)",
            checks=len(failed),
            failing_steps=tuple(step for step, value in failed if value > 0),
            rel_error=series(f"{prefix}/{_REF_REL_DIFF}/{name}"),
            error_ratio=series(f"{prefix}/{_REF_ERROR_RATIO}/{name}"),
            kinks=0,
        ))
    ref_failing = {step for step, value in series(f"{prefix}/{_REF_FAILURES}") if value > 0}
    worst_tag = f"{prefix}/{_WORST}/"
    ranks = sorted((int(tag[len(worst_tag):]), tag) for tag in tags
                   if tag.startswith(worst_tag) and tag[len(worst_tag):].isdigit())
    by_rank = [dict(series(tag)) for _, tag in ranks]
    worst_step = max((step for points in by_rank for step in points), default=None)
    worst: list[tuple[str | None, float]] = []
    if worst_step is not None:
        ratios = {t.name: dict(t.error_ratio).get(worst_step) for t in tensors}
        for points in by_rank:
            if worst_step not in points:
                continue
            value = points[worst_step]  # the same float32 as the tensor's error_ratio point
            name = next((n for n, v in ratios.items() if v == value), None)
            ratios.pop(name, None)
            worst.append((name, value))
    return RunSummary(
        run=run,
        path=path,
        steps=tuple(step for step, _ in failures),
        failing_steps=tuple(step for step, value in failures if value > 0 or step in ref_failing),
        fail_threshold=threshold[-1][1] if threshold else 1.0,
        tensors=tuple(tensors),
        duplicate_steps=len(accumulator.Scalars(f"{prefix}/{_FAILURES}")) - len(failures),
        worst_step=worst_step,
        worst=tuple(worst),
    )


def _with_capsules(run: RunSummary, accumulator: Any, prefix: str) -> RunSummary:
    """``run`` with each tensor's capsule, from the rows of the ``<prefix>/capsules`` texts
    (``| `name` | `path` |``; a later check's row replaces an earlier one)."""
    tag = f"{prefix}/{_CAPSULES}/text_summary"
    if tag not in accumulator.Tags().get("tensors", []):
        return run
    named: dict[str, str] = {}
    for event in sorted(accumulator.Tensors(tag), key=lambda e: e.wall_time):
        text = b"".join(event.tensor_proto.string_val).decode("utf-8", "replace")
        for line in text.splitlines():
            cells = line.split("`")
            if line.startswith("| `") and len(cells) >= 5:
                named[cells[1]] = cells[3]
    tensors = tuple(dataclasses.replace(t, capsule=named.get(t.name, t.capsule)) for t in run.tensors)
    return dataclasses.replace(run, tensors=tensors)


def _table(runs: Sequence[RunSummary], out: TextIO, top: int | None = None) -> None:
    header = ("", "tensor", "checks", "failing", "first failing step", "worst rel_error", "at step",
              "worst error/tol", "at step", "kinks")
    for i, run in enumerate(runs):
        if i:
            out.write("\n")
        first = "" if run.first_failing_step is None else f" (first at step {run.first_failing_step})"
        name = run.path if run.run == "." else run.run
        out.write(f"run {name}: {len(run.steps)} checks, {len(run.failing_steps)} failing{first}\n")
        if run.duplicate_steps:
            out.write(f"  note: {run.duplicate_steps} steps were logged more than once in {run.path!r} "
                      "(several trainings in one directory?); the last point of each step is kept\n")
        if run.worst:
            shown = ", ".join(f"{'?' if n is None else repr(n)} {_fmt(v)}" for n, v in run.worst[:_WORST_SHOWN])
            more = f", ... ({len(run.worst)} ranked)" if len(run.worst) > _WORST_SHOWN else ""
            out.write(f"  worst error/tol at the last check (step {run.worst_step}): {shown}{more}\n")
        tensors = run.tensors
        if top is not None and len(tensors) > top:
            def worst_ratio(t: TensorSummary) -> float:
                return -math.inf if t.worst_error_ratio is None else t.worst_error_ratio[1]

            kept = {t.name for t in sorted(tensors, key=worst_ratio, reverse=True)[:top]}
            kept |= {t.name for t in tensors if t.failing_steps}
            tensors = tuple(t for t in tensors if t.name in kept)
            out.write(f"  {len(tensors)} of {len(run.tensors)} tensors: the {top} with the largest worst error/tol"
                      " and every failing one (--top)\n")
        rows = [header]
        for t in tensors:
            rel, ratio = t.worst_rel_error, t.worst_error_ratio
            rows.append((
                "FAIL" if t.failing_steps else "ok", t.name, str(t.checks), str(len(t.failing_steps)),
                "-" if t.first_failing_step is None else str(t.first_failing_step),
                _fmt(None if rel is None else rel[1]), "-" if rel is None else str(rel[0]),
                _fmt(None if ratio is None else ratio[1]), "-" if ratio is None else str(ratio[0]),
                str(t.kinks),
            ))
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        for row in rows:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [cell.rjust(w) for cell, w in zip(row[2:], widths[2:])]
            out.write("  " + "  ".join(cells).rstrip() + "\n")
        for t in tensors:
            if t.capsule is not None and t.failing_steps:
                out.write(f"  capsule of {t.name!r}: {t.capsule}\n")
    checks = sum(len(r.steps) for r in runs)
    failing = sum(len(r.failing_steps) for r in runs)
    failed_runs = sum(r.failed for r in runs)
    verdict = (f"FAIL: {failing} of {checks} checks failed ({failed_runs} of {len(runs)} runs)" if failing
               else f"PASS: no failing check ({checks} checks in {len(runs)} run{'s' if len(runs) > 1 else ''})")
    out.write(f"\n{verdict}\n")


def _json(runs: Sequence[RunSummary], logdir: str, prefix: str) -> str:
    return json.dumps({
        "logdir": logdir,
        "prefix": prefix,
        "failed": any(r.failed for r in runs),
        "checks": sum(len(r.steps) for r in runs),
        "failing_checks": sum(len(r.failing_steps) for r in runs),
        "runs": [r.to_dict() for r in runs],
    }, indent=2, allow_nan=False)


def _plot(runs: Sequence[RunSummary], path: str) -> None:
    from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend

    fig = Figure(figsize=(10, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    several = len(runs) > 1
    for i, run in enumerate(runs):
        style = ("-", "--", ":", "-.")[i % 4]  # one line style per run, colours per tensor
        for j, t in enumerate(run.tensors):
            label = f"{run.run}: {t.name}" if several else t.name
            for ax, points in ((top, t.rel_error), (bottom, t.error_ratio)):
                if points:
                    ax.plot(*zip(*points), color=f"C{j % 10}", linestyle=style, marker="o", markersize=3, label=label)
            above = [(s, v) for s, v in t.error_ratio if v > run.fail_threshold]
            if above:
                bottom.scatter(*zip(*above), marker="x", color="red", zorder=3)
    for threshold in sorted({r.fail_threshold for r in runs}):
        bottom.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"fail threshold {_fmt(threshold)}")
    top.set(yscale="log", ylabel="relative error", title="gradwatch: relative error per tensor")
    bottom.set(yscale="log", ylabel="error / tolerance", xlabel="step",
               title="error / tolerance per tensor (a tensor fails above the threshold; x = failing check)")
    for ax in (top, bottom):
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = bottom.get_legend_handles_labels()
    if len(labels) <= 30:
        bottom.legend(handles, labels, fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=100)


def _parser() -> argparse.ArgumentParser:
    from gradwatch import __version__

    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="gradwatch",
        description="Check, during real PyTorch training, that the gradients are the gradients of the loss.\n"
                    "Training code uses the library (gradwatch.GradWatch, gradwatch.GradWatchCallback); this "
                    "command\nreads what it logged to TensorBoard and runs the demo.",
        epilog="examples:\n"
               "  gradwatch demo                          train the planted-bug model, log to runs/planted_bug\n"
               "  gradwatch report runs                   per-tensor table of every run under runs/\n"
               "  gradwatch report runs --json            the same as JSON\n"
               "  gradwatch report runs --plot g.png      relative error and error/tolerance over steps\n"
               "  gradwatch report runs || exit 1         gate CI: exit status 1 when a check failed\n\n"
               "'gradwatch COMMAND --help' describes each command.",
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    report = commands.add_parser(
        "report", formatter_class=formatter,
        help="per-tensor table of the gradwatch checks logged to TensorBoard (exit 1 on failures)",
        description="Read the TensorBoard event files under LOGDIR (every run directory, recursively, every\n"
                    "point) and print, per run and tensor, the checks, failing checks, first failing step,\n"
                    "worst relative error and worst error/tolerance (above 1 fails) with their steps, and\n"
                    "kink crossings.\n\n"
                    "exit status: 0 no check failed, 1 a check failed, 2 usage error or no gradwatch data.",
        epilog="examples:\n"
               "  gradwatch report runs\n"
               "  gradwatch report lightning_logs/version_3 --prefix gradwatch\n"
               "  gradwatch report runs --json > gradwatch.json\n"
               "  gradwatch report runs --top 20              the 20 worst tensors of a large model\n"
               "  gradwatch report runs --plot gradwatch.png   (pip install 'gradwatch[plot]')\n\n"
               "The JSON schema is in docs/how-it-works.md (section Command line) and in gradwatch/cli.py.",
    )
    report.add_argument("logdir", metavar="LOGDIR", help="TensorBoard log directory (searched recursively)")
    report.add_argument("--prefix", default="gradwatch", type=_argparse_type(_check_prefix),
                        help="key prefix the runs were logged with (default: gradwatch)")
    report.add_argument("--json", action="store_true", help="print JSON instead of the table")
    report.add_argument("--top", metavar="N", type=_argparse_type(functools.partial(_positive_int, "top"), int),
                        help="table only the N tensors with the largest worst error/tolerance, and every failing "
                             "one (for models with many tensors; --json keeps all)")
    report.add_argument("--plot", metavar="PNG",
                        help="also save a figure of relative error and error/tolerance over steps (needs matplotlib)")

    demo_parser = commands.add_parser(
        "demo", formatter_class=formatter,
        help="train a small model with a planted backward bug and watch gradwatch catch it",
        description="Train a small classifier whose custom autograd.Function has a planted backward bug\n"
                    "(bias gradient: mean instead of sum over the batch), with gradwatch checking every\n"
                    "--every steps and logging to TensorBoard; print the verdict and how to look at it.\n\n"
                    "exit status: 0 when gradwatch caught the planted bug (with --fixed: passed every\n"
                    "check), 1 otherwise, 2 usage error.",
        epilog="examples:\n"
               "  gradwatch demo                       then: gradwatch report runs/planted_bug\n"
               "  gradwatch demo --fixed               the correct backward: every check passes\n"
               "  gradwatch demo --steps 100 --every 20 --logdir /tmp/gw",
    )
    demo._add_arguments(demo_parser)

    repro = commands.add_parser(
        "repro", formatter_class=formatter,
        help="rerun the check a failing step saved as a capsule (exit 1 when it fails again)",
        description="Load a capsule (<logdir>/gradwatch/capsules/step-<N>-<module>.pt, written by a failing\n"
                    "check) and rerun that check with the gradients training produced: the same verdicts and\n"
                    "numbers on the same device and precision. A module-local capsule rebuilds the module\n"
                    "from its class path (no arguments) unless --module names a class or factory; a whole-model\n"
                    "capsule needs Python (gradwatch.load_capsule(path).check(model, loss_fn)).\n\n"
                    "exit status: 0 the check passes, 1 it fails, 2 usage error or an unusable capsule.",
        epilog="examples:\n"
               "  gradwatch repro runs/gradwatch/capsules/step-40000-blocks.3.attn.pt\n"
               "  gradwatch repro CAPSULE --module mypkg.layers:make_attention --device cpu\n"
               "  gradwatch repro CAPSULE --pytest > tests/test_repro_attn.py   then fix, and run pytest",
    )
    repro.add_argument("capsule", metavar="CAPSULE", help="the capsule file (.pt)")
    repro.add_argument("--module", metavar="PKG.MOD:NAME",
                       help="class or no-argument factory of the module (or the custom op) to load the capsule into")
    repro.add_argument("--device", help="where to replay (default: where it was written when available, else cpu)")
    repro.add_argument("--pytest", action="store_true",
                       help="print a pytest file that reruns the check with the module's own backward instead")
    return parser


def _import_target(spec: str) -> Any:
    module_name, _, qualname = spec.partition(":")
    import importlib

    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _pytest_file(capsule: Any, spec: str | None) -> str:
    """A pytest file that rebuilds the module and reruns the capsule's check with its own backward."""
    spec = spec or capsule.target
    if capsule.is_op and spec == capsule.target:
        build, imports = "None  # the custom op, found by its name", ""
        hint = capsule.data.get("import_hint")
        imports = f"import {hint}  # defines {capsule.target}\n" if hint else ""
    else:
        module_name, _, qualname = spec.partition(":")
        head = qualname.split(".")[0]
        imports = f"from {module_name} import {head}\n"
        build = f"{qualname}()" if not capsule.is_op else qualname
    test = "test_" + "".join(c if c.isalnum() else "_" for c in f"step_{capsule.step}_{capsule.name}")
    return (f'"""Reruns the gradient check that failed at step {capsule.step} ({capsule.name}), from its capsule:\n'
            f'it fails until the backward is fixed. Written by `gradwatch repro --pytest`."""\n\n'
            f"import gradwatch\n{imports}\nCAPSULE = {capsule.path!r}\n\n\n"
            f"def {test}():\n"
            f"    capsule = gradwatch.load_capsule(CAPSULE)\n"
            f"    report = capsule.check({build}, grads=\"autograd\")  # the module's own backward, now\n"
            f"    assert report.ok, str(report)\n")


def _repro(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from gradwatch.capsule import load_capsule

    try:
        capsule = load_capsule(args.capsule)
    except (OSError, ValueError) as error:
        err.write(f"gradwatch repro: error: {error}\n")
        return 2
    if capsule.kind == "model":
        err.write(f"gradwatch repro: error: {args.capsule} is a whole-model capsule: rerun it in Python with "
                  "gradwatch.load_capsule(path).check(model, loss_fn)\n")
        return 2
    if args.pytest:
        out.write(_pytest_file(capsule, args.module))
        return 0
    try:
        module = None
        if args.module is not None:
            target = _import_target(args.module)
            module = target if capsule.is_op else target()
        if module is None:
            module = capsule.build()
        notes = capsule.replay_notes(module, args.device)
        with warnings.catch_warnings():  # the same notes, written below
            warnings.filterwarnings("ignore", message="gradwatch capsule replay", category=UserWarning)
            report = capsule.check(module, device=args.device)
    except (ImportError, AttributeError, ValueError, RuntimeError) as error:
        err.write(f"gradwatch repro: error: {type(error).__name__}: {error}\n")
        return 2
    for note in notes:
        err.write(f"gradwatch repro: note: {note}\n")
    for line in capsule.missing:
        err.write(f"gradwatch repro: left out of the capsule: {line}\n")
    out.write(str(report) + "\n")
    return 0 if report.ok else 1


def _report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401  (fail before reading the logs)
        except ImportError:
            err.write(f"gradwatch report: error: {_PLOT_MISSING}\n")
            return 2
    try:
        runs = summarize(args.logdir, prefix=args.prefix)
    except (OSError, ValueError) as error:
        err.write(f"gradwatch report: error: {error}\n")
        return 2
    if args.json:
        out.write(_json(runs, args.logdir, args.prefix) + "\n")
    else:
        _table(runs, out, args.top)
    if args.plot is not None:
        _plot(runs, args.plot)
        err.write(f"gradwatch report: wrote {args.plot}\n")
    return 1 if any(r.failed for r in runs) else 0


def _demo(args: argparse.Namespace) -> int:
    watch = demo.run(steps=args.steps, every=args.every, logdir=args.logdir, fixed=args.fixed, seed=args.seed)
    ok = [report.ok for _, report in watch.reports]
    as_expected = (bool(ok) and all(ok)) if args.fixed else not all(ok)
    return 0 if as_expected else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradwatch`` command with ``argv`` (default ``sys.argv[1:]``).

    Args:
        argv: The arguments after the program name.

    Returns:
        The exit status: ``report`` 0 when no check failed, 1 when one did, 2 when
        ``LOGDIR`` is missing or holds no gradwatch scalars; ``demo`` 0 when the
        planted bug was caught (with ``--fixed``: every check passed). Usage errors
        exit with status 2 (``SystemExit``, from argparse), ``--help`` with 0.

    Example:
        >>> main(["report", "runs", "--json"])  # doctest: +SKIP
        1
    """
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _report(args, sys.stdout, sys.stderr)
    if args.command == "repro":
        return _repro(args, sys.stdout, sys.stderr)
    return _demo(args)

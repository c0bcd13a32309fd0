"""Writing capsules during training (private): the watch core's one call after a check.

:class:`_CapsuleWriter` keeps the run's caps (the first failure per module and per op, at
most ``max_count`` capsules and ``max_total_bytes`` bytes per run, ``max_bytes`` per capsule),
writes on rank zero only, and never stops training: a write that fails gives one
``UserWarning`` and no capsule is written after it. It reads the tensors it saves (clones),
draws no random number and changes neither the model nor the report.

Under several processes (DDP, FSDP2) the capsule is rank zero's: its batch (or the module's
recorded inputs and ``grad_out``) with its *own* gradients, before they were averaged over the
processes, so that one process replays like with like; the capsule's ``processes`` entry says
so (:attr:`gradwatch.capsule.Capsule.processes`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from gradwatch.capsule import _model_capsule, _module_capsule, _processes, _save
from gradwatch.options import ProbeOptions
from gradwatch.replay import ReplayState
from gradwatch.report import Report

__all__: list[str] = []

MAX_BYTES = 32 * 2**20  # one capsule
MAX_COUNT = 8  # capsules per run
MAX_TOTAL_BYTES = 256 * 2**20  # per run


def _capsules_option(name: str, value: Any) -> Any:
    """``None`` (capsules next to the adapter's logs, when it has some), ``False`` (none),
    ``True`` (next to the logs, the same as None), or a directory (str / PathLike)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (str, os.PathLike)) and os.fspath(value):
        return os.fspath(value)
    raise ValueError(f"`{name}` must be None, a bool or a directory path, got {value!r}"[:300])


def _capsule_dir(option: Any, logdir: str | None) -> str | None:
    """Where an adapter's capsules go: an explicit directory, else ``<logdir>/gradwatch/capsules``."""
    if option is False:
        return None
    if isinstance(option, str):
        return option
    return None if logdir is None else os.path.join(logdir, "gradwatch", "capsules")


def _file_name(step: int, name: str) -> str:
    return f"step-{step}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name) or 'model'}.pt"


class _CapsuleWriter:
    """The capsules of one run (see the module docstring)."""

    def __init__(self, directory: str | None, *, max_bytes: int = MAX_BYTES, max_count: int = MAX_COUNT,
                 max_total_bytes: int = MAX_TOTAL_BYTES) -> None:
        self.directory = directory
        self.max_bytes, self.max_count, self.max_total_bytes = max_bytes, max_count, max_total_bytes
        self.written: dict[str, str] = {}  # module name ("" for the whole model) -> path
        self.sizes: dict[str, tuple[int, float]] = {}  # module name -> (bytes written, seconds to build and write)
        self.total_bytes = 0
        self.seconds = 0.0
        self.broken = False  # a write failed: no more attempts this run

    def named(self, report: Report) -> Report:
        """``report`` with the capsule of each failing tensor and reference comparison
        (:attr:`Report.capsules`): its module's (``<module>::<tensor>``) or the whole model's."""
        if report.ok or not self.written:
            return report
        names = {}
        for name in [t.name for t in report.failures] + [f"{r.name} (reference)" for r in report.reference_failures]:
            key = name.removesuffix(" (reference)").rsplit("::", 1)[0] if "::" in name else ""
            if key in self.written:
                names[name] = self.written[key]
        return dataclasses.replace(report, capsules=names) if names else report

    def wants(self, keys: Any = ("",)) -> bool:
        """Whether a failure of one of ``keys`` (module names, ``""`` the whole model) would be
        written by this process now (what to keep for it is then worth recording)."""
        return any(self._open(key) for key in keys)

    def _open(self, key: str) -> bool:
        if self.directory is None or self.broken or key in self.written or len(self.written) >= self.max_count:
            return False
        if self.total_bytes >= self.max_total_bytes:
            return False
        dist = torch.distributed
        return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)

    def _write(self, key: str, step: int, build: Callable[[int], dict]) -> None:
        started = time.perf_counter()
        try:
            budget = min(self.max_bytes, self.max_total_bytes - self.total_bytes)
            data = build(budget)
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, _file_name(step, key if key else "model"))
            size = _save(data, path)
        except Exception as err:  # noqa: BLE001 (never stop the training for a capsule)
            self.broken = True
            warnings.warn(f"gradwatch: could not write a capsule under {self.directory!r} "
                          f"({type(err).__name__}: {err}); training goes on, no more capsules this run",
                          UserWarning, stacklevel=4)
            return
        finally:
            seconds = time.perf_counter() - started
            self.seconds += seconds
        self.written[key] = path
        self.sizes[key] = (size, seconds)
        self.total_bytes += size

    def whole(self, report: Report, model: nn.Module, batch: Any, grads: Mapping[str, Tensor],
              replay: ReplayState | None, train_loss: Any, seed: int, options: ProbeOptions, names: Any,
              loss_factor: tuple[str, Any] | None = None, own: "_Own | None" = None) -> None:
        """After the whole-model check: a capsule when it failed. ``own``: under several processes,
        this process's own gradients (``grads`` are then their mean, not saved)."""
        if report.ok or not self._open(""):
            return
        processes = None if own is None else _processes(*_rank_and_world())

        def build(budget: int) -> dict:
            data = _model_capsule(
                model, step=report.step, seed=seed, options=options, batch=batch,
                grads=grads if own is None else own.unscaled(), replay=replay, train_loss=train_loss, names=names,
                loss_factor=loss_factor, max_bytes=budget, processes=processes)
            if own is not None and own.grads is None:
                data.pop("grads", None)
                data["missing"].append("grads: only their mean over processes was recorded, not this process's "
                                       "own; replay with check(model, loss_fn, grads='autograd')")
            return data

        self._write("", report.step, build)

    def local(self, step: int, records: Mapping[str, Any], reports: list[Report], options: Sequence[ProbeOptions],
              own: Mapping[str, tuple] | None = None) -> None:
        """After the module-local checks (``reports`` in ``records`` order, each with the seed its
        check used, and ``options`` it ran with): a capsule per failing module (a failing tensor or
        a failing reference comparison). ``own``: under several processes, each record's own
        ``(param_grads, grad_inputs)`` (:func:`_own_records`)."""
        processes = None if own is None else _processes(*_rank_and_world())
        for (name, record), report, used in zip(records.items(), reports, options):
            if report.ok or not self._open(name):
                continue
            self._write(name, step, lambda budget: _module_capsule(
                record, step=step, seed=report.seed, options=used, max_bytes=budget,
                device=next((t.device for t in record.leaves if isinstance(t, Tensor)), None),
                own=None if own is None else own.get(name, ({}, {})), processes=processes))


class _Own:
    """This process's own gradients of a distributed check step (before averaging), as recorded:
    ``grads`` (None: not recorded) and the GradScaler ``scale`` they still carry (None: none)."""

    def __init__(self, grads: Mapping[str, Tensor] | None, scale: float | None) -> None:
        self.grads, self.scale = grads, scale

    def unscaled(self) -> dict[str, Tensor]:
        grads = dict(self.grads or {})
        return grads if self.scale is None else {n: g / self.scale for n, g in grads.items()}


def _own_records(records: Mapping[str, Any], local: Mapping[str, Tensor] | None) -> dict[str, tuple]:
    """Each record's own ``(param_grads, grad_inputs)`` before a distributed check averages them;
    ``local``: the local gradients by model-level name (under ``fully_shard``, where the record's
    own tensor hooks do not see the gathered parameters)."""
    out = {}
    for name, record in records.items():
        if local is None:
            params = dict(record.param_grads)
        else:
            prefix = f"{name}." if name else ""
            params = {p: local[prefix + p] for p, _ in record.module.named_parameters() if prefix + p in local}
        out[name] = (params, dict(record.grad_inputs))
    return out


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

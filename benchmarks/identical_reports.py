"""Prove that a refactor changes no gradwatch report, bit for bit.

The script runs a fixed, deterministic set of gradient checks and writes one text line
per :class:`gradwatch.Report`: a label, a tab, then a canonical serialisation of the
whole report (every dataclass field, recursively, floats as ``float.hex()``; NaN as its
raw bits). Run it once on the code before the refactor (``--write``), then on the code
after it (``--compare``): every line must be identical.

Run (always one thread; import gradwatch from the tree under test with PYTHONPATH):

    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/before /work/main/.venv/bin/python \\
        benchmarks/identical_reports.py --write /work/baseline_reports.txt
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/after /work/main/.venv/bin/python \\
        /work/wt-harness/benchmarks/identical_reports.py --compare /work/baseline_reports.txt

``--compare`` prints ``N reports, all identical`` (exit status 0), or the first differing
labels with the fields that differ (exit status 1; also for missing or extra labels).
``--only SUBSTRING`` (repeatable) runs only the runs whose label contains it (with
``--compare``, only their lines are compared): a quick way to rerun a failing part, and
to see that a run gives the same lines whatever ran before it.

Which code runs: ``gradwatch`` is whatever ``import gradwatch`` finds (PYTHONPATH; the
copy is printed on stderr and in the written file's header line). Everything else (the
model zoo ``tests/zoo.py``, ``tests/_attn_op.py``, ``examples/*.py`` and
``benchmarks/vs_gradcheck.py``) is taken from the repository this script lives in, not
from the tree under test, so the checked cases are the same on both sides.

Serialisation: dataclass fields in declaration order (each dataclass also writes its type
name), tuples/lists with their length, mappings with their key order, floats with
``float.hex()`` (NaN: its 64 raw bits), bool/int/str/None as ``repr``, tensors as dtype,
shape and the hex of their bytes. Dropped because they hold wall-clock time and differ
from run to run: the fields named ``seconds`` (``Report.seconds``, ``ModuleCheck.seconds``)
or ``check_seconds``. Besides the fields, each line has a few derived values (prefixed
``~``): ``verdict``, ``ok``, ``metrics()`` without ``check_seconds``, ``str(report)`` and
``markdown()`` with the seconds of the summary line masked. Exception messages (recorded
instead of a report when a call raises) get the same masking and hide memory addresses.

What runs (about 300 reports, ~1.5 minutes of CPU on one thread):

1. Engine on the zoo (``tests/zoo.py``: BUGS, TRAINING_ONLY_BUGS, SPARSE_BUGS, CORRECT, each
   builder once): ``check(seed=0)`` on the cases built with seeds 0 and 1; at case seed 0
   also ``precision="native"``, the smallest budgeted check (``coordinates=0,
   directions=0, richardson=False, kink_resamples=0``), ``evaluation="sequential"``,
   ``reference=False`` and ``assert_gradients(allow_unverified=True)`` (a
   ``GradientCheckError`` is recorded as its message and its report; another
   ``AssertionError`` as its message). Also ``check(seed=0)`` on the two wider cases of
   ``benchmarks/vs_gradcheck.py``'s zoo table (``wide bias_mean``, ``wide wrong_row``).
2. Training adapters (constructor arguments limited to ``every_n_steps``, ``max_overhead``,
   ``seed``, ``on_failure`` and ``modules``, which exist before and after the refactor;
   ``max_overhead=None`` since a budget makes the schedule depend on wall time):
   ``GradWatch`` over 5 SGD steps on 8 zoo cases (bugs with custom Functions, a hook, a
   low-precision kernel, a sparse bug; dropout, BatchNorm, transformer, a correct custom
   Function); ``lightning.pytorch`` ``GradWatchCallback`` in ``Trainer.fit`` (4 steps) on a
   buggy and a dropout model; the Hugging Face ``Trainer`` with ``GradWatchTrainerCallback``
   (its default loss, the model's own) on a one-block GPT-2 built from a config, no download:
   with a planted bug (4 steps, checks at 0 and 2) and correct (1 step; a GPT-2 check costs
   seconds).
3. Module-local checks: ``check_module`` on the custom attention op of
   ``tests/_attn_op.py`` (correct, each planted bug, with a registered reference, bf16
   inputs) and on a float64 custom Function; ``GradWatch`` with ``modules="suspects"`` on
   the attention net and a zoo case with a custom Function, with a list of modules, with
   modules called twice or with tied weights (skipped with a reason), and on a model with
   dropout, BatchNorm and the op (``modules=["attn", "norm"]``, 4 steps). References are
   registered per module instance, so no run leaves one behind.
4. Examples, each imported from ``examples/`` and its ``main`` run with few steps
   (stdout discarded, logs in a temporary directory): ``train_planted_bug`` (the
   ``gradwatch.demo``, 5 steps) and ``custom_op_kernel`` (its unit test and GradWatch, 5
   steps), checks every 2 steps; ``lightning_custom_layer`` (3 steps, every 2) and
   ``hf_trainer`` (1 step: one check), each with the planted bug and ``--fixed``. None is
   skipped.
5. The tiny-op table of ``benchmarks/vs_gradcheck.py --table tiny``: its exact
   ``assert_gradients`` calls (``_tiny_ops`` and ``_OpInputs`` imported from that file),
   at the defaults and with ``thorough=True``, the buggy Function row included. Its
   gradcheck timings are not reports and are not run.

Every run starts from the same state: torch/NumPy/Python RNGs seeded with 0, float32
default dtype, one torch thread, the attention op's planted bug off. Labels are
``<section>/<run>``, plus ``/step=<step>#<i>`` for each report of an adapter run and
``/raised`` when a run raised; the file is about 15 MB (every probe of every report).

Not covered (no deterministic single-process CPU run): GPU paths (TF32, CUDA autocast,
GradScaler), multi-process DDP/FSDP runs, ``max_overhead`` budgets (their schedule depends
on wall time), and what sinks write (TensorBoard events, log lines: made from the reports).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import logging
import math
import os
import pathlib
import random
import re
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402  (from PYTHONPATH: the tree under test; before the paths below are added)

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository of this script: cases, examples
sys.path.append(str(ROOT / "tests"))  # appended: never shadows the gradwatch under test
sys.path.append(str(ROOT / "benchmarks"))

from zoo import BUGS, CORRECT, SPARSE_BUGS, TRAINING_ONLY_BUGS, Case  # noqa: E402

#: Fields holding wall-clock time, left out of the serialisation.
TIMING_FIELDS = frozenset({"seconds", "check_seconds"})

_SECONDS = re.compile(r"\b\d+\.\d+s\)")  # the time in a summary line: "...; 0.13s)"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# ============================================================================ serialisation
def _text(s: str) -> str:
    """A string as stable text: the check's seconds and memory addresses masked."""
    return _ADDRESS.sub(" at 0x?", _SECONDS.sub("<seconds>s)", s))


def _float(x: float) -> str:
    if math.isnan(x):
        return "nan:" + struct.pack(">d", x).hex()
    return x.hex()


def _flatten(obj: Any, path: str, out: list[tuple[str, str]]) -> None:
    """Append ``(path, value)`` for ``obj`` and everything inside it."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out.append((path, f"<{type(obj).__name__}>"))
        for f in dataclasses.fields(obj):
            if f.name in TIMING_FIELDS:
                continue
            _flatten(getattr(obj, f.name), f"{path}.{f.name}", out)
    elif obj is None or isinstance(obj, (bool, str)):
        out.append((path, repr(obj)))
    elif isinstance(obj, int):
        out.append((path, repr(obj) if type(obj) is int else f"{type(obj).__name__}:{obj!r}"))
    elif isinstance(obj, float):
        out.append((path, _float(obj) if type(obj) is float else f"{type(obj).__name__}:{_float(obj)}"))
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        out.append((path, f"<tensor {t.dtype} {tuple(obj.shape)} {t.view(torch.uint8).numpy().tobytes().hex()}>"))
    elif isinstance(obj, np.ndarray):
        out.append((path, f"<ndarray {obj.dtype} {obj.shape} {np.ascontiguousarray(obj).tobytes().hex()}>"))
    elif isinstance(obj, np.generic):
        out.append((path, f"{type(obj).__name__}:{obj.tobytes().hex()}"))
    elif isinstance(obj, (tuple, list)):
        out.append((path, f"<{type(obj).__name__} len={len(obj)}>"))
        for i, x in enumerate(obj):
            _flatten(x, f"{path}[{i}]", out)
    elif isinstance(obj, Mapping):
        keys = list(obj.keys())
        out.append((path, f"<{type(obj).__name__} keys={[repr(k) for k in keys]}>"))
        for k in keys:
            _flatten(obj[k], f"{path}[{k!r}]", out)
    elif isinstance(obj, (torch.dtype, torch.device)):
        out.append((path, repr(obj)))
    else:  # not expected in a report: kept, by type and masked repr
        out.append((path, f"<?{type(obj).__module__}.{type(obj).__qualname__}> {_text(repr(obj))}"))


def _derived(report: Any, out: list[tuple[str, str]]) -> None:
    """Values computed from the fields (properties and texts of report.py), timing masked."""
    try:
        out.append(("~verdict", repr(report.verdict)))
        out.append(("~ok", repr(report.ok)))
        metrics = {k: v for k, v in gradwatch.metrics(report).items() if not k.endswith("/check_seconds")}
        _flatten(metrics, "~metrics", out)
        out.append(("~str", repr(_text(str(report)))))
        out.append(("~markdown", repr(_text(report.markdown()))))
    except Exception as err:  # noqa: BLE001  (a derived value that raises is part of the comparison)
        out.append(("~derived_raised", repr(_text(f"{type(err).__name__}: {err}"))))


def serialise(obj: Any) -> str:
    """The canonical text of a report (or of an exception, or an outcome of a run): tab-separated
    ``path=value`` tokens; repr escapes tabs and newlines, so the text is one line."""
    out: list[tuple[str, str]] = []
    if isinstance(obj, BaseException):
        out.append(("!raised", repr(_text(f"{type(obj).__name__}: {obj}"))))
        report = getattr(obj, "report", None)
        if isinstance(report, gradwatch.Report):
            _flatten(report, "report", out)
            _derived(report, out)
    elif isinstance(obj, gradwatch.Report):
        _flatten(obj, "report", out)
        _derived(obj, out)
    else:
        _flatten(obj, "value", out)
    return "\t".join(f"{p}={v}" for p, v in out)


# ============================================================================ deterministic state
def reset() -> None:
    """The state every run starts from, whatever ran before."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    if "_attn_op" in sys.modules:
        sys.modules["_attn_op"].BUG["mode"] = None


def _ignore(report: Any) -> None:
    """on_failure callable: keep quiet (the reports are in the adapter's ``reports``)."""


def _engine(fn: Callable[[], Any]) -> Callable[[], list[tuple[str, Any]]]:
    """A run of one call: its report, or the exception it raised."""
    def run() -> list[tuple[str, Any]]:
        try:
            return [("", fn())]
        except Exception as err:  # noqa: BLE001
            return [("", err)]
    return run


def _adapter_reports(reports: list, tag: str = "") -> list[tuple[str, Any]]:
    return [(f"{tag}step={step}#{i}", r) for i, (step, r) in enumerate(reports)]


# ============================================================================ 1. engine on the zoo
def _zoo_cases() -> list[tuple[str, str, Callable[[int], Case]]]:
    seen: set[int] = set()
    cases = []
    for group, builders in (("BUGS", BUGS), ("TRAINING_ONLY_BUGS", TRAINING_ONLY_BUGS),
                            ("SPARSE_BUGS", SPARSE_BUGS), ("CORRECT", CORRECT)):
        for name, build in builders.items():
            if id(build) not in seen:  # hook_rescale is in two groups: once
                seen.add(id(build))
                cases.append((group, name, build))
    return cases


def _case(build: Callable[[int], Case], seed: int) -> Case:
    torch.manual_seed(0)
    return build(seed)


def _assert_gradients(case: Case) -> Any:
    return gradwatch.assert_gradients(case.model, case.loss_fn, case.batch, allow_unverified=True)


def engine_runs() -> Iterator[tuple[str, Callable]]:
    variants: list[tuple[str, tuple[int, ...], Callable[[Case], Any]]] = [
        ("check", (0, 1), lambda c: gradwatch.check(c.model, c.loss_fn, c.batch, seed=0)),
        ("check_native", (0,), lambda c: gradwatch.check(c.model, c.loss_fn, c.batch, seed=0, precision="native")),
        ("check_smallest", (0,), lambda c: gradwatch.check(c.model, c.loss_fn, c.batch, seed=0, coordinates=0,
                                                          directions=0, richardson=False, kink_resamples=0)),
        ("check_sequential", (0,), lambda c: gradwatch.check(c.model, c.loss_fn, c.batch, seed=0,
                                                            evaluation="sequential")),
        ("check_noreference", (0,), lambda c: gradwatch.check(c.model, c.loss_fn, c.batch, seed=0, reference=False)),
        ("assert_gradients", (0,), _assert_gradients),
    ]
    for group, name, build in _zoo_cases():
        for variant, seeds, call in variants:
            for seed in seeds:
                yield (f"engine/{group}/{name}/case_seed={seed}/{variant}",
                       _engine(lambda build=build, seed=seed, call=call: call(_case(build, seed))))
    import vs_gradcheck  # benchmarks/vs_gradcheck.py of this repository: its zoo table's wider cases

    for name in ("wide bias_mean", "wide wrong_row"):
        yield (f"engine/vs_gradcheck/{name}/check",  # as its run_gradwatch
               _engine(lambda build=vs_gradcheck.CASES[name]: variants[0][2](_case(build, 0))))


# ============================================================================ 2. training adapters
def _batches(case: Case, n: int, seed: int = 0) -> list:
    """``n`` batches shaped like ``case.batch`` (floats ~ N(0, 1), integers in its range), the first
    being ``case.batch`` itself."""
    g = torch.Generator().manual_seed(seed)
    out = [case.batch]
    for _ in range(n - 1):
        out.append(tuple(torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point()
                         else torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)
                         for t in case.batch))
    return out


def _train(model: nn.Module, loss_fn: Callable, batches: list, **watch_kwargs: Any) -> list[tuple[str, Any]]:
    """A plain SGD loop under GradWatch; every report, then the exception if one was raised."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwargs = dict(every_n_steps=2, max_overhead=None, seed=123, on_failure=_ignore)
    kwargs.update(watch_kwargs)
    watch = None
    try:
        watch = gradwatch.GradWatch(model, loss_fn, **kwargs)
        for batch in batches:
            opt.zero_grad()
            with watch.step(batch):
                loss_fn(model, batch).backward()
            opt.step()
        return _adapter_reports(watch.reports)
    except Exception as err:  # noqa: BLE001
        return (_adapter_reports(watch.reports) if watch is not None else []) + [("raised", err)]


_TRAINING_CASES = [("BUGS", "wrong_sign"), ("BUGS", "hook_rescale"), ("TRAINING_ONLY_BUGS", "low_precision_kernel"),
                   ("SPARSE_BUGS", "wrong_row"), ("CORRECT", "mlp_relu_dropout"), ("CORRECT", "cnn_bn_pool"),
                   ("CORRECT", "transformer"), ("CORRECT", "custom_function")]


def _lightning_run(group: str, name: str) -> list[tuple[str, Any]]:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    for logger in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(logger).setLevel(logging.ERROR)  # after the import, which sets them to INFO

    builders = {"BUGS": BUGS, "CORRECT": CORRECT}[group]
    case = _case(builders[name], 0)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = case.model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return case.loss_fn(self.net, batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    columns = [torch.cat([b[i] for b in _batches(case, 4)]) for i in range(len(case.batch))]
    loader = DataLoader(TensorDataset(*columns), batch_size=case.batch[0].shape[0], shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    callback = gradwatch.GradWatchCallback(every_n_steps=2, max_overhead=None, seed=7, on_failure=_ignore)
    try:
        trainer = L.Trainer(max_steps=4, callbacks=[callback], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
        trainer.fit(Module(), loader)
        return _adapter_reports(callback.reports)
    except Exception as err:  # noqa: BLE001
        return _adapter_reports(callback.reports) + [("raised", err)]


def _hf_run(bug: bool, steps: int) -> list[tuple[str, Any]]:
    from torch.utils.data import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    vocab, seq = 64, 16

    class TokenData(Dataset):  # as tests/test_hf.py: random token sequences, the labels are the inputs
        def __init__(self) -> None:
            self.ids = torch.randint(0, vocab, (32, seq), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class RowsOff(torch.autograd.Function):  # tests/test_hf.py's planted bug: every 8th row 2% off
        @staticmethod
        def forward(ctx, weight):
            return weight.view_as(weight)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            grad[::8] *= 1.02
            return grad

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))  # one block: a GPT-2 check is slow
    if bug:
        layer = model.transformer.h[0].mlp.c_fc

        def forward(x):
            out = torch.addmm(layer.bias, x.view(-1, x.size(-1)), RowsOff.apply(layer.weight))
            return out.view(*x.shape[:-1], layer.nf)

        layer.forward = forward
    callback = gradwatch.GradWatchTrainerCallback(every_n_steps=2, max_overhead=None, seed=7, on_failure=_ignore)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = TrainingArguments(output_dir=tmp, max_steps=steps, report_to="none", use_cpu=True, save_strategy="no",
                                     logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=4, seed=0,
                                     data_seed=0)
            Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback]).train()
        return _adapter_reports(callback.reports)
    except Exception as err:  # noqa: BLE001
        return _adapter_reports(callback.reports) + [("raised", err)]


def adapter_runs() -> Iterator[tuple[str, Callable]]:
    groups = {"BUGS": BUGS, "TRAINING_ONLY_BUGS": TRAINING_ONLY_BUGS, "SPARSE_BUGS": SPARSE_BUGS, "CORRECT": CORRECT}
    for group, name in _TRAINING_CASES:
        def run(build=groups[group][name]) -> list[tuple[str, Any]]:
            case = _case(build, 0)
            return _train(case.model, case.loss_fn, _batches(case, 5))
        yield f"adapter/GradWatch/{group}/{name}", run
    for group, name in (("BUGS", "wrong_sign"), ("CORRECT", "mlp_relu_dropout")):
        yield f"adapter/lightning/{group}/{name}", lambda group=group, name=name: _lightning_run(group, name)
    yield "adapter/hf/gpt2/bug", lambda: _hf_run(True, 4)  # checks at steps 0 and 2
    yield "adapter/hf/gpt2/correct", lambda: _hf_run(False, 1)


# ============================================================================ 3. module-local checks
def _attn() -> Any:
    import _attn_op  # tests/_attn_op.py (registers the custom op gwtest::attention once per process)

    return _attn_op


def _qkv(seed: int, shape: tuple[int, ...] = (2, 4, 4)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).requires_grad_(True) for _ in range(3))


def _attn_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 6, generator=g), torch.randint(0, 3, (3,), generator=g)


def _xent(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _check_module_attention(mode: str | None, *, seed: int = 0, reference: bool = False, bf16: bool = False,
                            grad_outputs: bool = False) -> Any:
    op = _attn()
    op.BUG["mode"] = mode
    module = op.FusedAttention()
    if reference:
        gradwatch.register_reference(module, op.reference_attention)  # this instance only
    qkv = _qkv(seed)
    if bf16:
        qkv = tuple(t.detach().bfloat16().requires_grad_(True) for t in qkv)
    if grad_outputs:
        torch.manual_seed(0)
        return gradwatch.check_module(module, qkv, torch.randn(2, 4, 4), seed=0)
    return gradwatch.check_module(module, qkv, name="attn", seed=0)


class _TanhFn(torch.autograd.Function):
    """tests/test_local.py's float64 Function ``tanh(x @ w)``, optionally with w's gradient 1.5x."""

    @staticmethod
    def forward(ctx, x, w, wrong):
        ctx.save_for_backward(x, w)
        ctx.wrong = wrong
        return torch.tanh(x @ w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        d = g * (1 - torch.tanh(x @ w) ** 2)
        dw = x.transpose(0, 1) @ d
        return d @ w.transpose(0, 1), dw * (1.5 if ctx.wrong else 1.0), None


class _TanhLayer(nn.Module):
    def __init__(self, wrong: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.wrong = wrong

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TanhFn.apply(x, self.w, self.wrong)


def _check_module_float64(wrong: bool, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    layer = _TanhLayer(wrong)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    return gradwatch.check_module(layer, (x,), seed=0, **kwargs)


def _watch_attention(mode: str | None, *, reference: bool, **kwargs: Any) -> list:
    op = _attn()
    op.BUG["mode"] = mode
    torch.manual_seed(0)
    model = op.AttnNet()
    if reference:
        gradwatch.register_reference(model.attn, op.reference_attention)  # this instance only
    return _train(model, _xent, [_attn_batch(s) for s in range(3)], every_n_steps=1, seed=0, **kwargs)


def _watch_attention_bf16() -> list:
    """tests/test_local.py: the training forward under bf16 autocast, the grad_output-layout bug."""
    op = _attn()
    op.BUG["mode"] = "contiguous"
    torch.manual_seed(0)
    model = op.AttnNet()
    batch = _attn_batch(0)
    watch = gradwatch.GradWatch(model, _xent, every_n_steps=1, max_overhead=None, seed=0, on_failure=_ignore)
    with watch.step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _xent(model, batch)
        loss.backward()
    return _adapter_reports(watch.reports)


class _Doubled(torch.autograd.Function):  # y = x W^T, with W's gradient doubled (tests/test_local.py)
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, 2 * g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


class _Buggy(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Doubled.apply(x, self.weight) + self.bias


def _watch_module_list() -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), _Buggy(8, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    return _train(model, _xent, batches, every_n_steps=1, seed=0, modules=[model[0], "2", model[4]])


class _Twice(nn.Module):
    """A module called twice, and tied weights (tests/test_local.py): both skipped with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.enc = nn.Linear(4, 6)
        self.dec = nn.Linear(6, 4)
        self.dec.weight = nn.Parameter(torch.randn(4, 6))
        self.tied = nn.Linear(6, 4)
        self.tied.weight = self.dec.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.shared(torch.tanh(self.shared(x))))
        return self.dec(h) + self.tied(h)


def _watch_twice() -> list:
    torch.manual_seed(0)
    model = _Twice()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)) for _ in range(2)]
    return _train(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batches, every_n_steps=1, seed=0,
                  modules=["shared", "dec", "enc"])


def _watch_noisy() -> list:
    op = _attn()

    class Noisy(nn.Module):  # tests/test_local.py: dropout, BatchNorm and the attention op
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 12)
            self.norm = nn.BatchNorm1d(4)
            self.drop = nn.Dropout(0.2)
            self.attn = op.FusedAttention()
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.drop(self.norm(self.inp(x))).chunk(3, -1)
            return self.head(torch.cat([self.attn(q, k, v), v], -1)).sum(1)

    torch.manual_seed(0)
    model = Noisy()
    gradwatch.register_reference(model.attn, op.reference_attention)
    return _train(model, _xent, [_attn_batch(s) for s in range(4)], every_n_steps=1, seed=0, modules=["attn", "norm"])


def _watch_zoo_suspects() -> list:
    case = _case(CORRECT["custom_function"], 0)
    out = _train(case.model, case.loss_fn, _batches(case, 3), every_n_steps=1, seed=0, modules="suspects")
    case = _case(BUGS["wrong_sign"], 0)
    out += [("wrong_sign/" + label, r) for label, r in
            _train(case.model, case.loss_fn, _batches(case, 3), every_n_steps=1, seed=0, modules="suspects")]
    return out


def local_runs() -> Iterator[tuple[str, Callable]]:
    for mode in (None, "dq", "dk", "contiguous"):
        yield f"local/check_module/attention/bug={mode}", _engine(lambda mode=mode: _check_module_attention(mode))
    yield ("local/check_module/attention/bug=contiguous/grad_outputs",
           _engine(lambda: _check_module_attention("contiguous", grad_outputs=True)))
    for mode in (None, "dk"):
        yield (f"local/check_module/attention/bug={mode}/reference",
               _engine(lambda mode=mode: _check_module_attention(mode, seed=1, reference=True)))
    for seed in (0, 1):
        yield (f"local/check_module/attention/bf16/seed={seed}",
               _engine(lambda seed=seed: _check_module_attention(None, seed=seed, bf16=True)))
    yield "local/check_module/attention/bf16/bug=dq", _engine(lambda: _check_module_attention("dq", bf16=True))
    for wrong in (False, True):
        yield f"local/check_module/float64_function/wrong={wrong}", _engine(lambda w=wrong: _check_module_float64(w))
    yield ("local/check_module/float64_function/wrong=True/native",
           _engine(lambda: _check_module_float64(True, precision="native")))
    for mode in (None, "dq", "dk", "contiguous"):
        yield (f"local/GradWatch/attention/bug={mode}/reference",
               lambda mode=mode: _watch_attention(mode, reference=True))
    yield "local/GradWatch/attention/bug=dk/suspects", lambda: _watch_attention("dk", reference=False,
                                                                                 modules="suspects")
    yield "local/GradWatch/attention/bug=dk/modules=None", lambda: _watch_attention("dk", reference=False,
                                                                                     modules=None)
    yield "local/GradWatch/attention/bug=contiguous/bf16_autocast", _watch_attention_bf16
    yield "local/GradWatch/zoo_custom_function/suspects", _watch_zoo_suspects
    yield "local/GradWatch/module_list", _watch_module_list
    yield "local/GradWatch/called_twice_tied", _watch_twice
    yield "local/GradWatch/dropout_batchnorm_attention", _watch_noisy


# ============================================================================ 4. examples
_EXAMPLES: dict[str, Any] = {}


def _example(name: str) -> Any:
    """``examples/<name>.py`` of this repository, loaded once (custom_op_kernel registers its ops)."""
    if name not in _EXAMPLES:
        spec = importlib.util.spec_from_file_location(f"gradwatch_example_{name}", ROOT / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _EXAMPLES[name] = module
    return _EXAMPLES[name]


def _run_example(name: str, args: list[str], outdir_flag: str) -> list[tuple[str, Any]]:
    module = _example(name)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        try:
            result = module.main(args + [outdir_flag, tmp])
        except Exception as err:  # noqa: BLE001
            return [("raised", err)]
    if name == "custom_op_kernel":  # Outcome(unit_test: Report | GradientCheckError, watch)
        return [("unit_test", result.unit_test)] + _adapter_reports(result.watch.reports, "watch/")
    return _adapter_reports(result.reports)


def example_runs() -> Iterator[tuple[str, Callable]]:
    specs = [("train_planted_bug", ["--steps", "5", "--every", "2"], "--logdir"),
             ("custom_op_kernel", ["--steps", "5", "--every", "2"], "--logdir"),
             ("lightning_custom_layer", ["--steps", "3", "--every", "2"], "--root"),
             ("hf_trainer", ["--steps", "1", "--every", "2"], "--output")]  # one check: a GPT-2 check is slow
    for name, args, flag in specs:
        for fixed in (False, True):
            yield (f"example/{name}/{'fixed' if fixed else 'bug'}",
                   lambda name=name, args=args, flag=flag, fixed=fixed:
                   _run_example(name, args + (["--fixed"] if fixed else []), flag))


# ============================================================================ 5. tiny-op table
def tiny_runs() -> Iterator[tuple[str, Callable]]:
    import vs_gradcheck  # benchmarks/vs_gradcheck.py of this repository

    for label, op, shapes in vs_gradcheck._tiny_ops():
        for thorough in (False, True):
            def run(op=op, shapes=shapes, thorough=thorough) -> Any:  # as vs_gradcheck.tiny_table's `ours`
                module = vs_gradcheck._OpInputs(op, shapes)
                weights = torch.randn(module().shape, generator=torch.Generator().manual_seed(1))
                kwargs = {"thorough": True} if thorough else {}
                return gradwatch.assert_gradients(module, lambda m, r: (m() * r).sum(), weights, **kwargs)
            yield f"tiny/{label}/{'thorough' if thorough else 'default'}", _engine(run)


# ============================================================================ driver
def all_runs() -> Iterator[tuple[str, Callable]]:
    yield from engine_runs()
    yield from adapter_runs()
    yield from local_runs()
    yield from example_runs()
    yield from tiny_runs()


def produce(only: list[str] | None) -> Iterator[tuple[str, str]]:
    """``(label, serialisation)`` of every report of the selected runs, in a fixed order."""
    for label, run in all_runs():
        if only and not any(s in label for s in only):
            continue
        reset()
        started = time.perf_counter()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # runs print; keep stdout ours
            warnings.simplefilter("ignore")
            try:
                results = run()
            except Exception as err:  # noqa: BLE001  (a run that raises is recorded as such)
                results = [("raised", err)]
        print(f"  {time.perf_counter() - started:6.2f}s  {label} ({len(results)})", file=sys.stderr, flush=True)
        if not results:
            results = [("", "<no report>")]
        for suffix, obj in results:
            yield (f"{label}/{suffix}" if suffix else label), serialise(obj)


def _tokens(text: str) -> dict[str, str]:
    out = {}
    for token in text.split("\t"):
        path, _, value = token.partition("=")
        out[path] = value
    return out


def _short(value: str | None, n: int = 100) -> str:
    if value is None:
        return "(absent)"
    return value if len(value) <= n else value[: n - 3] + "..."


def _diff(old: str, new: str, max_fields: int = 8) -> list[str]:
    a, b = _tokens(old), _tokens(new)
    paths = list(a) + [p for p in b if p not in a]
    differing = [p for p in paths if a.get(p) != b.get(p)]
    lines = [f"      {p}: {_short(a.get(p))} -> {_short(b.get(p))}" for p in differing[:max_fields]]
    if len(differing) > max_fields:
        lines.append(f"      ... {len(differing) - max_fields} more differing fields")
    if not differing:  # same fields, other order
        lines.append("      same fields and values, in another order")
    return lines


def _read(path: str) -> list[tuple[str, str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line and not line.startswith("#"):
                label, _, text = line.partition("\t")
                out.append((label, text))
    return out


def compare(baseline: list[tuple[str, str]], produced: list[tuple[str, str]], only: list[str] | None) -> int:
    if only:  # compare only the lines of the selected runs
        labels = {label for label, _ in produced}
        baseline = [(label, text) for label, text in baseline if label in labels or any(s in label for s in only)]
    old = dict(baseline)
    new = dict(produced)
    if len(old) != len(baseline) or len(new) != len(produced):
        print("duplicate labels: the baseline or this run is malformed")
        return 1
    missing = [label for label, _ in baseline if label not in new]
    extra = [label for label, _ in produced if label not in old]
    differing = [label for label, _ in produced if label in old and old[label] != new[label]]
    order_changed = [label for label, _ in baseline if label in new] != [label for label, _ in produced if label in old]
    if not (missing or extra or differing or order_changed):
        print(f"{len(produced)} reports, all identical")
        return 0
    print(f"{len(produced)} reports produced, baseline {len(baseline)}: {len(differing)} differ, "
          f"{len(missing)} missing, {len(extra)} extra" + (", order changed" if order_changed else ""))
    for label in differing[:5]:
        print(f"  DIFFERS {label}")
        print("\n".join(_diff(old[label], new[label])))
    if len(differing) > 5:
        print(f"  ... and {len(differing) - 5} more differing: " + ", ".join(differing[5:25])
              + (" ..." if len(differing) > 25 else ""))
    for label in missing[:10]:
        print(f"  MISSING (in the baseline, not produced) {label}")
    for label in extra[:10]:
        print(f"  EXTRA (produced, not in the baseline) {label}")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="FILE", help="write the reports to FILE (the baseline)")
    mode.add_argument("--compare", metavar="FILE", help="compare the reports with FILE; exit status 1 on a difference")
    parser.add_argument("--only", action="append", metavar="SUBSTRING",
                        help="run only the runs whose label contains SUBSTRING (repeatable)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    print(f"gradwatch from {pathlib.Path(gradwatch.__file__).parent}; cases from {ROOT}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
    baseline = _read(args.compare) if args.compare else None  # fail early on a missing file
    started = time.perf_counter()
    produced = list(produce(args.only))
    seconds = time.perf_counter() - started
    print(f"{len(produced)} reports in {seconds:.0f}s", file=sys.stderr)
    if args.write:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(f"# benchmarks/identical_reports.py: {len(produced)} reports; gradwatch from "
                    f"{pathlib.Path(gradwatch.__file__).parent}; torch {torch.__version__}\n")
            for label, text in produced:
                f.write(f"{label}\t{text}\n")
        print(f"wrote {len(produced)} reports to {args.write}")
        return 0
    return compare(baseline, produced, args.only)


if __name__ == "__main__":
    sys.exit(main())

"""Capsules: everything a failing check needs, saved to rerun that exact check offline.

When a check fails during training, the adapters write a *capsule* per failing module
(and one for the whole model) under ``<logdir>/gradwatch/capsules/step-<N>-<module>.pt``:
for a module-local check the module's recorded inputs, the ``grad_out`` that flowed into
it, its parameters and buffers, the RNG and autocast state its forward started from, its
class path (or the custom op's ``ns::name``), the gradients training produced, and the
check's seed and options; for the whole model the batch, the ``state_dict``, the
gradients under test, the replay state, the training loss, the seed, the options and the
tensors checked (what is over the size cap is left out, and named in :attr:`Capsule.missing`).

A capsule holds tensors and plain data only (dicts, lists, tuples, str, int, float, bool,
None): :func:`load_capsule` reads it with ``torch.load(..., weights_only=True)`` and refuses
anything else. The module is rebuilt by the caller (:meth:`Capsule.check` loads the captured
state into the module it is given), or from the class path / op name.

:meth:`Capsule.check` reruns the check: with ``grads="recorded"`` (default) it compares the
gradients training produced, which gives the training report's verdicts and numbers again
(on the same device and precision); with ``grads="autograd"`` it recomputes them with the
given module's own backward on the recorded inputs, which is what a fix changes.
``gradwatch repro CAPSULE`` does the same from the command line.

Under several processes (DDP, FSDP2) rank zero writes the capsule: its own batch (or the
module's inputs and ``grad_out`` on rank zero) and its own gradients, before they were
averaged over the processes, so that one process replays like with like (the training's
verdicts; rank zero's numbers, not the cross-rank means): :attr:`Capsule.processes` says so.
:meth:`Capsule.replay_notes` says what else differs from training (device, TF32, autocast,
dtypes); :meth:`Capsule.check` warns with them.

Example:
    >>> import gradwatch, torch, tempfile, os
    >>> lin = torch.nn.Linear(3, 2)
    >>> x = torch.randn(4, 3, requires_grad=True)
    >>> from gradwatch._recording import _Recording
    >>> with _Recording({"lin": lin}) as rec:
    ...     lin(x).sum().backward()
    >>> path = os.path.join(tempfile.mkdtemp(), "lin.pt")
    >>> _ = _save(_module_capsule(rec.records["lin"], step=0, seed=1, options=ProbeOptions()), path)
    >>> capsule = load_capsule(path)
    >>> capsule.kind, capsule.name, capsule.target
    ('module', 'lin', 'torch.nn.modules.linear:Linear')
    >>> capsule.check(torch.nn.Linear(3, 2)).ok
    True
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pickle
import warnings
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from gradwatch._recording import _op_name, _OpModule, _Record
from gradwatch.engine import _check_with
from gradwatch.options import ProbeOptions
from gradwatch.replay import ReplayState, _autocast, _capture_attrs, _isolated, _restore_rng, _RNGState
from gradwatch.report import Report

__all__ = ["Capsule", "load_capsule"]

FORMAT = "gradwatch-capsule"
VERSION = 1


class _Unsupported(TypeError):
    """A value a capsule cannot hold as plain data."""


# --------------------------------------------------------------------------- plain encoding
def _encode(obj: Any) -> Any:
    """``obj`` as tensors and plain data (containers tagged so tuples stay tuples)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"t": "dtype", "v": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"t": "device", "v": str(obj)}
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return {"t": "tuple", "v": [_encode(x) for x in obj]}
    if type(obj) is list:
        return {"t": "list", "v": [_encode(x) for x in obj]}
    if type(obj) is dict and all(isinstance(k, (str, int)) for k in obj):
        return {"t": "dict", "k": list(obj), "v": [_encode(v) for v in obj.values()]}
    raise _Unsupported(f"a {type(obj).__name__} (only tensors, numbers, str and plain tuples/lists/dicts are kept)")


def _decode(obj: Any, device: torch.device | None = None) -> Any:
    if isinstance(obj, Tensor):
        return obj if device is None else obj.to(device)
    if isinstance(obj, dict):
        tag = obj["t"]
        if tag == "dtype":
            return getattr(torch, obj["v"])
        if tag == "device":
            return torch.device(obj["v"])
        if tag == "tuple":
            return tuple(_decode(x, device) for x in obj["v"])
        if tag == "list":
            return [_decode(x, device) for x in obj["v"]]
        return {k: _decode(v, device) for k, v in zip(obj["k"], obj["v"])}
    return obj


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in an encoded value."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _tensors(mapping: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in mapping.items()}


def _encode_replay(state: ReplayState) -> dict:
    rng = state.rng
    numpy = rng.numpy
    return {
        "torch_cpu": rng.torch_cpu.clone(),
        "cuda": None if rng.cuda is None else [t.clone() for t in rng.cuda],
        "numpy": [str(numpy[0]), torch.from_numpy(np.asarray(numpy[1]).astype(np.int64)), int(numpy[2]),
                  int(numpy[3]), float(numpy[4])],
        "python": [int(rng.python[0]), list(rng.python[1]), rng.python[2]],
        "buffers": _tensors(state.buffers),
        "autocast": {d: [bool(e), str(dt).removeprefix("torch.")] for d, (e, dt) in state.autocast.items()},
    }


def _decode_replay(data: Mapping[str, Any], module: nn.Module, device: torch.device | None) -> ReplayState:
    numpy = data["numpy"]
    cuda = data["cuda"]
    if cuda is not None and not (torch.cuda.is_available() and len(cuda) == torch.cuda.device_count()):
        cuda = None  # replayed without the GPU (or another count of them): its RNG is not restored
    rng = _RNGState(
        torch_cpu=data["torch_cpu"],
        cuda=None if cuda is None else tuple(cuda),
        numpy=(numpy[0], numpy[1].numpy().astype(np.uint32), numpy[2], numpy[3], numpy[4]),
        python=(data["python"][0], tuple(data["python"][1]), data["python"][2]),
    )
    buffers = {k: (v if device is None else v.to(device)) for k, v in data["buffers"].items()}
    autocast = {d: (e, getattr(torch, dt)) for d, (e, dt) in data["autocast"].items()}
    return ReplayState(rng=rng, buffers=buffers, attrs=_capture_attrs(module), autocast=autocast)


def _class_path(module: nn.Module) -> str:
    return f"{type(module).__module__}:{type(module).__qualname__}"


def _op_hint(op: str) -> str | None:
    """The Python module that defined custom op ``op`` (imported to find it again), or None."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(op)
    fn = getattr(opdef, "_init_fn", None)
    return getattr(fn, "__module__", None)


# --------------------------------------------------------------------------- building (the writer's side)
def _module_capsule(record: _Record, *, step: int, seed: int, options: ProbeOptions,
                    max_bytes: int | None = None, device: Any = None,
                    own: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
                    processes: Mapping[str, Any] | None = None) -> dict:
    """The capsule of one module-local check (``record`` as the check saw it). Under several
    processes, ``own``: this process's own ``(param_grads, grad_inputs)`` of the record (before
    they were averaged over processes), and ``processes``: :func:`_processes`' description."""
    module = record.module
    op = module.op_name if isinstance(module, _OpModule) else None
    data = _header("module", record.name, step, seed, options, device, processes)
    param_grads, grad_inputs = own if own is not None else (record.param_grads, record.grad_inputs)
    data.update(target=op if op is not None else _class_path(module), op=op is not None,
                import_hint=_op_hint(op) if op is not None else None)
    try:
        from torch.utils._pytree import treespec_dumps

        content = {
            "state": _tensors(module.state_dict()),
            "record": {
                "spec": treespec_dumps(record.spec),
                "leaves": [_encode(leaf) for leaf in record.leaves],
                "inputs": dict(record.inputs),
                "outputs": _tensors(record.outputs),
                "grad_outputs": {i: None if g is None else g.detach().clone() for i, g in record.grad_outputs.items()},
                "grad_output_strides": {i: list(s) for i, s in record.grad_output_strides.items()},
                "grad_inputs": _tensors(grad_inputs),
                "param_grads": _tensors(param_grads),
                "replay": _encode_replay(record.replay),
            },
        }
        if record.stateful:
            raise _Unsupported("mutable state among its arguments (a cache)")
    except Exception as err:  # noqa: BLE001 (a call that cannot be kept as plain data: say so in the capsule)
        data["missing"].append(f"record: its call cannot be saved as plain data ({type(err).__name__}: {err})"[:300])
        return data
    size = _nbytes(content)
    if max_bytes is not None and size > max_bytes:
        data["missing"].append(f"record and state: {size / 2**20:.1f} MiB > max_bytes {max_bytes / 2**20:.1f} MiB")
        return data
    data.update(content)
    return data


def _model_capsule(model: nn.Module, *, step: int, seed: int, options: ProbeOptions, batch: Any,
                   grads: Mapping[str, Tensor], replay: ReplayState | None, train_loss: Any,
                   names: Any, loss_factor: tuple[str, Any] | None = None, max_bytes: int | None = None,
                   processes: Mapping[str, Any] | None = None) -> dict:
    """The capsule of a whole-model check; groups that do not fit ``max_bytes`` are left out.
    ``loss_factor``: ``("div", n)`` or ``("mul", factor)``, what the check's loss applied to the
    user's loss (None: nothing). Under several processes ``grads`` are this process's own (of
    ``batch``, before averaging) and ``processes`` says so (:func:`_processes`)."""
    device = next((p.device for p in model.parameters()), None)
    data = _header("model", "", step, seed, options, device, processes)
    data.update(target=_class_path(model), op=False, import_hint=None,
                names=None if names is None else list(names),
                train_loss=None if train_loss is None else float(train_loss),
                loss_factor=None if loss_factor is None else [loss_factor[0], _encode(loss_factor[1])])
    groups: list[tuple[str, Callable[[], Any]]] = [
        ("grads", lambda: _tensors(grads)),
        ("replay", lambda: None if replay is None else _encode_replay(replay)),
        ("batch", lambda: _encode(batch)),
        ("state", lambda: _tensors(model.state_dict())),
    ]
    used = 0
    for key, build in groups:
        try:
            value = build()
        except Exception as err:  # noqa: BLE001
            data["missing"].append(f"{key}: cannot be saved as plain data ({type(err).__name__}: {err})"[:300])
            continue
        size = _nbytes(value)
        if max_bytes is not None and used + size > max_bytes:
            data["missing"].append(f"{key}: {size / 2**20:.1f} MiB would take the capsule over max_bytes "
                                   f"{max_bytes / 2**20:.1f} MiB")
            continue
        used += size
        data[key] = value
    return data


def _header(kind: str, name: str, step: int, seed: int, options: ProbeOptions, device: Any,
            processes: Mapping[str, Any] | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": kind, "name": name, "step": int(step), "seed": int(seed),
            "options": dataclasses.asdict(options), "device": None if device is None else str(device),
            "torch": str(torch.__version__), "precision": _precision_state(),
            "processes": None if processes is None else dict(processes), "missing": []}


def _precision_state() -> dict:
    """The float32 math settings the check ran under (TF32 on CUDA)."""
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


def _processes(rank: int, world_size: int) -> dict:
    """What a capsule written under ``world_size`` processes holds: process ``rank``'s own part."""
    return {"rank": int(rank), "world_size": int(world_size),
            "gradients": f"process {rank}'s own gradients of its own batch (before they were averaged over "
                         f"{world_size} processes); training judged the mean over processes, the replay "
                         f"judges process {rank}'s part alone"}


def _save(data: dict, path: str) -> int:
    """Write ``data`` to ``path`` atomically; the bytes written."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


# --------------------------------------------------------------------------- loading (the user's side)
@dataclasses.dataclass(frozen=True)
class Capsule:
    """A loaded capsule (see the module docstring).

    Attributes:
        path: The file.
        kind: ``"module"`` (a module-local check) or ``"model"`` (the whole-model check).
        name: The module's qualified name (``""`` for the whole model; ``ns::op`` for a custom op).
        target: ``pkg.mod:Class`` of the module (or the model), or the custom op's ``ns::name``.
        step: The training step of the check.
        seed: The check's seed.
        options: The check's :class:`~gradwatch.ProbeOptions`.
        device: The device the check ran on (``"cuda:0"``, ``"cpu"``).
        missing: What was left out (over the size cap, or not plain data), one line each.
        data: The plain content.
    """

    path: str
    kind: str
    name: str
    target: str
    step: int
    seed: int
    options: ProbeOptions
    device: str | None
    missing: tuple[str, ...]
    data: Mapping[str, Any] = dataclasses.field(repr=False)

    @property
    def is_op(self) -> bool:
        """Whether the capsule is of a ``torch.library`` custom op's call."""
        return bool(self.data.get("op"))

    def build(self) -> nn.Module | Callable:
        """The module (``Class()`` from :attr:`target`, no arguments) or the custom op."""
        if self.is_op:
            return _find_op(self.target, self.data.get("import_hint"))
        module_name, _, qualname = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
            return obj()
        except Exception as err:
            raise ValueError(f"cannot rebuild {self.target} with no arguments ({type(err).__name__}: {err}): "
                             "pass the module to check(module), or --module pkg.mod:factory") from err

    @property
    def processes(self) -> Mapping[str, Any] | None:
        """Under several processes (DDP, FSDP2): ``{"rank", "world_size", "gradients"}``, what the
        capsule holds (the writing process's own batch and gradients, not their mean over
        processes); ``None`` for a single-process check."""
        return self.data.get("processes")

    def replay_notes(self, module: Any = None, device: Any = None) -> tuple[str, ...]:
        """Lines saying where the replay differs from the training check: another device, other
        TF32 settings, an autocast state that does not apply on the replay's device, parameters
        of another dtype in ``module`` (the captured ones are cast into it), or a capsule of one
        process among several. Empty when none does.

        Example:
            >>> capsule.replay_notes(device="cpu")  # doctest: +SKIP
            ('capsule written on cuda:0, replayed on cpu: ...',)
        """
        dev = _device(self, device)
        notes = []
        written = torch.device(self.device) if self.device is not None else None
        if written is not None and written.type != dev.type:
            notes.append(f"capsule written on {self.device}, replayed on {dev}: verdicts are expected to hold, "
                         "numbers may differ in the last digits")
        recorded, now = self.data.get("precision") or {}, _precision_state()
        then_cuda, now_cuda = getattr(written, "type", None) == "cuda", dev.type == "cuda"
        if then_cuda and now_cuda:
            changed = [k for k in now if k in recorded and recorded[k] != now[k]]
            if changed:
                notes.append("float32 math settings differ from training's: " + ", ".join(
                    f"{k} {recorded[k]!r} then, {now[k]!r} now" for k in changed))
        elif then_cuda and _tf32(recorded):
            notes.append(f"training's float32 math on {self.device} allowed TF32 ({_tf32(recorded)}); {dev.type} has "
                         "none: float32 results are more precise here")
        elif now_cuda and _tf32(now):
            notes.append(f"this replay's float32 math on {dev} allows TF32 ({_tf32(now)}); training on "
                         f"{self.device} had none")
        for device_type, (enabled, dtype) in _recorded_autocast(self.data).items():
            if enabled and device_type != dev.type:
                notes.append(f"training ran under {device_type} autocast ({dtype}), which does not apply on "
                             f"{dev.type}: its ops run in their own dtypes here")
        if isinstance(module, nn.Module):
            state = self.data.get("state") or {}
            mine = {**dict(module.named_parameters()), **dict(module.named_buffers())}
            cast = sorted({f"{state[k].dtype} -> {mine[k].dtype}".replace("torch.", "") for k in state
                           if k in mine and state[k].is_floating_point() and state[k].dtype != mine[k].dtype})
            if cast:
                notes.append(f"the module's parameters have another dtype than training's ({', '.join(cast)}): "
                             "the captured values are cast into it")
        if self.processes is not None:
            notes.append(f"written by process {self.processes['rank']} of {self.processes['world_size']}: "
                         f"{self.processes['gradients']}; verdicts are expected to hold, numbers differ from "
                         "the training report's")
        return tuple(notes)

    def replay_note(self, device: Any = None) -> str | None:
        """:meth:`replay_notes` (without a module) in one line, or None."""
        notes = self.replay_notes(device=device)
        return "; ".join(notes) if notes else None

    def check(self, module: Any = None, loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, *,
              device: Any = None, grads: str = "recorded") -> Report:
        """Rerun the captured check.

        Args:
            module: The module (its class as in training; the captured parameters and buffers are
                loaded into it), a custom op, or ``None`` to rebuild it from :attr:`target`.
                For a ``"model"`` capsule: the model (required).
            loss_fn: ``loss_fn(model, batch)`` of a ``"model"`` capsule (required there): the
                user's loss; the factor training applied to it (Lightning's division under
                gradient accumulation, the HF Trainer's factor) is in the capsule and applied here.
            device: Where to replay (default: where it was written when available, else CPU).
            grads: ``"recorded"``: the gradients training produced (the same report);
                ``"autograd"``: recomputed here by the module's own backward (what a fix changes).

        Returns:
            The :class:`~gradwatch.Report` of the rerun check.

        Raises:
            ValueError: When what the check needs was left out of the capsule, or on bad arguments.
        """
        if grads not in ("recorded", "autograd"):
            raise ValueError(f"`grads` must be 'recorded' or 'autograd', got {grads!r}")
        dev = _device(self, device)
        if self.kind == "model" and (not isinstance(module, nn.Module) or loss_fn is None):
            raise ValueError("a whole-model capsule needs check(model, loss_fn)")
        if self.kind != "model" and module is None:
            _need(self, "record", "state")
            module = self.build()
        notes = self.replay_notes(module, dev)
        if notes:
            warnings.warn("gradwatch capsule replay: " + "; ".join(notes), UserWarning, stacklevel=2)
        if self.kind == "model":
            return _check_model(self, module, loss_fn, dev, grads)
        return _check_module(self, module, dev, grads)


def _tf32(precision: Mapping[str, Any]) -> str:
    """Which of the float32 math settings allow TF32 on CUDA ("" for none)."""
    on = [name for key, name in (("cuda_matmul_allow_tf32", "matmul"), ("cudnn_allow_tf32", "cuDNN"))
          if precision.get(key)]
    if precision.get("float32_matmul_precision", "highest") != "highest" and "matmul" not in on:
        on.append(f"float32_matmul_precision {precision['float32_matmul_precision']!r}")
    return ", ".join(on)


def _recorded_autocast(data: Mapping[str, Any]) -> dict:
    """The autocast state of the captured forward: ``{device_type: (enabled, dtype name)}``."""
    replay = (data.get("record") or {}).get("replay") if data.get("kind") == "module" else data.get("replay")
    return {d: (bool(e), dt) for d, (e, dt) in ((replay or {}).get("autocast") or {}).items()}


def _device(capsule: Capsule, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    written = torch.device(capsule.device) if capsule.device else torch.device("cpu")
    if written.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return written


def _find_op(name: str, hint: str | None) -> Callable:
    ns, _, op = name.partition("::")
    if not hasattr(getattr(torch.ops, ns), op) and hint:
        importlib.import_module(hint)
    try:
        return getattr(getattr(torch.ops, ns), op)
    except (AttributeError, RuntimeError) as err:
        raise ValueError(f"custom op {name} is not registered: import the module that defines it "
                         f"({hint or 'unknown'}) or pass the op to check()") from err


def _need(capsule: Capsule, *keys: str) -> None:
    absent = [k for k in keys if k not in capsule.data]
    if absent:
        raise ValueError(f"capsule {capsule.path} lacks {', '.join(absent)}: " + "; ".join(capsule.missing))


def _check_module(capsule: Capsule, module: Any, device: torch.device, grads: str) -> Report:
    from gradwatch.local import _check_record

    _need(capsule, "record", "state")
    if module is None:
        module = capsule.build()
    op = _op_name(module)
    if op is not None:
        module = _OpModule(module, op)
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be an nn.Module or a custom op, got {type(module).__name__}")
    module.load_state_dict(capsule.data["state"])
    module.to(device)
    rec = capsule.data["record"]
    record = _Record(capsule.name, module, calls=1, spec=pytree.treespec_loads(rec["spec"]),
                     leaves=[_decode(leaf, device) for leaf in rec["leaves"]], inputs=dict(rec["inputs"]),
                     outputs={i: t.to(device) for i, t in rec["outputs"].items()},
                     grad_outputs={i: None if g is None else g.to(device) for i, g in rec["grad_outputs"].items()},
                     grad_inputs={k: g.to(device) for k, g in rec["grad_inputs"].items()},
                     param_grads={k: g.to(device) for k, g in rec["param_grads"].items()},
                     replay=_decode_replay(rec["replay"], module, device),
                     grad_output_strides={i: tuple(s) for i, s in rec.get("grad_output_strides", {}).items()})
    if grads == "autograd":
        record.grad_inputs, record.param_grads = _recompute(record)
        with torch.no_grad():  # the outputs of the module as it is now (its training loss)
            record.outputs = _outputs(record)
    return _check_record(record, seed=capsule.seed, options=capsule.options)


def _call(record: _Record, leaves: list) -> Any:
    args, kwargs = pytree.tree_unflatten(leaves, record.spec)
    with _autocast(record.replay.autocast):
        return record.module(*args, **kwargs)


def _restore_buffers(module: nn.Module, buffers: Mapping[str, Tensor]) -> None:
    with torch.no_grad():
        for name, b in module.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])


def _outputs(record: _Record) -> dict:
    saved = {n: b.clone() for n, b in record.module.named_buffers()}
    with _isolated(record.module):
        _restore_rng(record.replay.rng)
        _restore_buffers(record.module, record.replay.buffers)
        leaves = pytree.tree_leaves(_call(record, record.call_leaves()))
    _restore_buffers(record.module, saved)
    return {i: leaves[i].detach() for i in record.outputs}


def _recompute(record: _Record) -> tuple[dict, dict]:
    """The module's own backward on the recorded inputs and ``grad_out``: (grad_inputs, param_grads)."""
    module = record.module
    saved = {n: b.clone() for n, b in module.named_buffers()}
    leaves = record.call_leaves()
    xs = {}
    for i in record.inputs:
        leaves[i] = xs[i] = leaves[i].detach().clone().requires_grad_(True)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    with _isolated(module), torch.enable_grad():
        _restore_rng(record.replay.rng)
        _restore_buffers(module, record.replay.buffers)
        outs = pytree.tree_leaves(_call(record, leaves))
        pairs = [(outs[i], _strided(g.to(outs[i].dtype), record.grad_output_strides.get(i)))
                 for i, g in record.grad_outputs.items()
                 if g is not None and isinstance(outs[i], Tensor) and outs[i].requires_grad]
        wrt = [*xs.values(), *params.values()]
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    _restore_buffers(module, saved)
    got_x, got_p = got[:len(xs)], got[len(xs):]
    grad_inputs = {record.inputs[i]: g for i, g in zip(xs, got_x) if g is not None}
    param_grads = {n: g for n, g in zip(params, got_p) if g is not None}
    return grad_inputs, param_grads


def _strided(g: Tensor, strides: tuple | None) -> Tensor:
    """``g`` in the memory layout training's ``grad_out`` had (``strides``; None: as it is)."""
    if strides is None or len(strides) != g.dim() or tuple(strides) == g.stride():
        return g
    # an expanded gradient (stride 0, e.g. of .sum()): one slice of it, expanded back
    zero = [d for d, (n, s) in enumerate(zip(g.shape, strides)) if s == 0 and n > 1]
    part = g
    for d in zero:
        part = part.narrow(d, 0, 1)
    try:
        out = torch.empty_strided(part.shape, strides, dtype=g.dtype, device=g.device).copy_(part)
    except RuntimeError:  # another overlapping layout: contiguous, as recorded
        return g
    return out.expand(g.shape) if zero else out


def _check_model(capsule: Capsule, model: nn.Module, loss_fn: Callable, device: torch.device, grads: str) -> Report:
    _need(capsule, "batch", *(["grads"] if grads == "recorded" else []))
    data = capsule.data
    if "state" in data:
        model.load_state_dict(data["state"])
    model.to(device)
    batch = _decode(data["batch"], device)
    names = data.get("names")
    loss_fn = _factored(loss_fn, data.get("loss_factor"), device)
    if grads == "autograd":
        with _isolated(model):
            if data.get("replay") is not None:
                replay = _decode_replay(data["replay"], model, device)
                _restore_rng(replay.rng)
                _restore_buffers(model, replay.buffers)
            report = _check_with(model, loss_fn, batch, capsule.options, seed=capsule.seed, grads="autograd",
                                 names=names)
    else:
        replay = None if data.get("replay") is None else _decode_replay(data["replay"], model, device)
        report = _check_with(model, loss_fn, batch, capsule.options, seed=capsule.seed,
                             grads={k: g.to(device) for k, g in data["grads"].items()}, replay=replay,
                             train_loss=data.get("train_loss"), names=names)
    return dataclasses.replace(report, step=capsule.step)


def _factored(loss_fn: Callable, factor: Any, device: torch.device) -> Callable:
    """``loss_fn`` with the stored factor applied with the adapter's arithmetic (bitwise the same):
    Lightning's ``loss / n`` (``lightning._divided``), the HF Trainer's ``loss * factor`` (``hf._scaled``)."""
    if factor is None:
        return loss_fn
    how, value = factor[0], _decode(factor[1], device)
    if how not in ("div", "mul"):
        raise ValueError(f"unknown loss factor {how!r} in the capsule")

    def factored(model: nn.Module, batch: Any) -> Tensor:
        loss = loss_fn(model, batch)
        if how == "div":
            return loss / value
        return loss * value.to(device=loss.device, dtype=loss.dtype)

    return factored


def load_capsule(path: str | os.PathLike, *, map_location: Any = "cpu") -> Capsule:
    """Load a capsule written by a failing check (tensors and plain data only).

    Args:
        path: The ``.pt`` file (``<logdir>/gradwatch/capsules/step-<N>-<module>.pt``).
        map_location: Where its tensors are loaded (``torch.load``'s; default CPU).

    Returns:
        A :class:`Capsule`; :meth:`Capsule.check` reruns the check.

    Raises:
        ValueError: When the file is not a gradwatch capsule, or needs arbitrary pickle
            (unsafe: it is not loaded).
        OSError: When the file cannot be read.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__} {path!r}"[:300])
    path = os.fspath(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "Unsupported" in ln or "WeightsUnpickler" in ln]
        raise ValueError(f"{path} is not a gradwatch capsule: it needs arbitrary pickle to load, which is unsafe, "
                         f"so it was refused ({(lines or [str(err)])[0][:200]})") from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a gradwatch capsule (unreadable: {str(err).splitlines()[0][:200]})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gradwatch capsule (no {FORMAT!r} format key)")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: capsule format version {data.get('version')!r}, this gradwatch reads {VERSION}")
    options = ProbeOptions(**data["options"])
    return Capsule(path=path, kind=data["kind"], name=data["name"], target=data["target"], step=data["step"],
                   seed=data["seed"], options=options, device=data.get("device"), missing=tuple(data["missing"]),
                   data=data)


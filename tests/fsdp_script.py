"""GradWatch on FSDP2 (``torch.distributed.fsdp.fully_shard``) models, 2 CPU processes (gloo).

Run by ``tests/test_fsdp.py``, once per rank, with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set::

    PYTHONPATH=.:tests python tests/fsdp_script.py OUTDIR SCENARIO

Each rank writes ``OUTDIR/rank<r>.json`` with what it saw, and tears its process group
down before exit. The group's timeout is short (a hang fails the test instead of the CI).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import sys
import warnings
from typing import Any, Callable


def shard(model, root: bool = True):
    """``fully_shard`` every child with parameters, then the root (the usual FSDP2 recipe;
    ``root=False``: the root's own parameters stay plain tensors)."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    if root:
        fully_shard(model)
    return model


def local_batch(batch: Any, rank: int, world: int, step: int) -> Any:
    """This rank's part of the zoo batch (a different part each step)."""
    import torch

    x, y = batch
    n = x.shape[0] // (2 * world)
    start = (rank + world * (step % 2)) * n
    idx = torch.arange(start, start + n)
    return x[idx], y[idx]


def train(build: Callable, *, steps: int, watch: dict | None, seed: int = 0, optimizer: str = "sgd",
          loss_fn: Callable | None = None, scale: float | None = None, root: bool = True) -> tuple[Any, Any, Any]:
    """Train a zoo case sharded over the ranks; returns (model, optimizer, GradWatch or None)."""
    import torch
    import torch.distributed as dist

    from gradwatch import GradWatch

    rank, world = dist.get_rank(), dist.get_world_size()
    case = build(seed)
    model = shard(case.model, root=root)
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1))
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    if scaler is not None:
        watch = {**watch, "scaler": scaler}
    gw = None if watch is None else GradWatch(model, loss_fn or case.loss_fn, **watch)
    for step in range(steps):
        batch = local_batch(case.batch, rank, world, step)
        if gw is None:
            case.loss_fn(model, batch).backward()
        else:
            with gw.step(batch):
                loss = case.loss_fn(model, batch)
                (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()
    return model, opt, gw


def summary(gw) -> dict[str, Any]:
    return {
        "verdicts": [r.verdict for _, r in gw.reports],
        "reliable": [r.reliable for _, r in gw.reports],
        "failing": [sorted(t.name for t in r.failures) for _, r in gw.reports],
        "worst": [{t.name: [t.worst.kind, list(t.worst.index or ()), t.worst.failed] for t in r.failures}
                  for _, r in gw.reports],
        "numbers": [[(p.autograd, p.numerical) for p in r.probes] for _, r in gw.reports],
        "seeds": [r.seed for _, r in gw.reports],
        "reports": [str(r) for _, r in gw.reports],
    }


def scenario_zoo(rank: int) -> dict[str, Any]:
    from zoo import BUGS, CORRECT, SPARSE_BUGS

    watch = dict(every_n_steps=1, max_overhead=None, on_failure=lambda report: None)
    out: dict[str, Any] = {"correct": {}, "bugs": {}}
    for name in ("mlp_relu_dropout", "layernorm_gelu", "custom_function", "cnn_bn_pool", "transformer"):
        out["correct"][name] = summary(train(CORRECT[name], steps=2, watch=watch)[2])
    # the root not sharded: its own parameter (layer scale's gamma) is a plain tensor, checked too
    out["plain_root"] = summary(train(CORRECT["layer_scale"], steps=2, watch=watch, root=False)[2])
    # the whole model's float64 copy over max_shadow_bytes: only the named modules are checked, and
    # only their parameters are gathered
    from gradwatch import ProbeOptions

    small = dict(watch, options=ProbeOptions(max_shadow_bytes=1))
    out["local_only"] = {
        name: summary(train(build, steps=1, watch=dict(small, modules=["fc1"]))[2])
        for name, build in (("wrong_sign", BUGS["wrong_sign"]), ("custom_function", CORRECT["custom_function"]))
    }
    # ... and without modules to check: nothing is gathered, the report says what to pass
    out["too_big"] = {
        str(modules): summary(train(CORRECT["custom_function"], steps=1, watch=dict(small, modules=modules))[2])
        for modules in (None, "suspects")
    }
    bugs = {**BUGS, **SPARSE_BUGS}
    for name in ("wrong_sign", "bias_mean", "ignores_grad_output", "wrong_index", "accidental_detach", "wrong_row"):
        out["bugs"][name] = {**summary(train(bugs[name], steps=2, watch=watch)[2]),
                             "wrong": sorted(bugs[name](0).wrong)}
    return out


def attention_case(seed: int):
    """qkv projection -> the fused attention op (a ``torch.library`` custom op without float64,
    tests/_attn_op.py) -> head."""
    import torch
    from torch import nn

    from tests._attn_op import FusedAttention
    from zoo import Case, classification_loss

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.attn = FusedAttention()
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return self.head(self.attn(q, k, v).mean(1))

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    batch = (torch.randn(16, 5, 8, generator=g), torch.randint(0, 3, (16,), generator=g))
    return Case("attention", Net(), classification_loss, batch)


def scenario_attention(rank: int) -> dict[str, Any]:
    """Module-local checks of the fused attention op under FSDP: its input gradients (dq, dk)."""
    import gradwatch
    from tests._attn_op import BUG, FusedAttention, reference_attention
    from gradwatch._references import _REFERENCES_BY_CLASS

    watch = dict(every_n_steps=1, max_overhead=None, on_failure=lambda report: None)
    out: dict[str, Any] = {}
    for mode, reference in ((None, False), ("dq", False), ("dk", False), (None, True), ("dk", True)):
        BUG["mode"] = mode
        if reference:
            gradwatch.register_reference(FusedAttention, reference_attention)
        try:
            seeds = range(3 if mode is None and not reference else 1)
            runs = [train(attention_case, steps=2, watch=watch, seed=seed)[2] for seed in seeds]
        finally:
            BUG["mode"] = None
            _REFERENCES_BY_CLASS.pop(FusedAttention, None)
        out[f"{mode}{'+reference' if reference else ''}"] = [
            {**summary(gw), "suspects": gw.suspects,
             "references": [[(c.name, c.verdict, c.error_ratio) for c in r.references] for _, r in gw.reports]}
            for gw in runs
        ]
    return out


def scenario_capsules(rank: int) -> dict[str, Any]:
    """Capsules under FSDP2: both ranks pass the same directory, rank 0 alone writes (its own
    batch, records and local gradients); the test replays them in one process."""
    import os

    from tests._attn_op import BUG
    from zoo import BUGS

    out: dict[str, Any] = {}
    for name, build, mode in (("wrong_sign", BUGS["wrong_sign"], None), ("attention", attention_case, "dk")):
        directory = os.path.join(os.environ["GW_CAPSULES"], name)
        BUG["mode"] = mode
        try:
            gw = train(build, steps=1, watch=dict(every_n_steps=1, max_overhead=None, seed=0, capsules=directory,
                                                  on_failure=lambda report: None))[2]
        finally:
            BUG["mode"] = None
        (_, report), = gw.reports
        out[name] = {"verdicts": {n: t.verdict for n, t in report.tensors.items()},
                     "references": {r.name: r.verdict for r in report.references},
                     "written": gw._watch.capsules.written}
    return out


def flaky_local_case(rank: int) -> Callable:
    """A model whose ``body`` raises on rank 1 when called on its own (its module-local check)."""
    import torch
    from torch import nn

    from zoo import Case, _data, classification_loss

    inside = {"net": False}  # not a module attribute: the replay would restore it

    class Body(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 16)

        def forward(self, x):
            if rank == 1 and not inside["net"]:
                raise RuntimeError("planted: body run alone fails on rank 1")
            return torch.tanh(self.lin(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = Body()
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            inside["net"] = True
            try:
                return self.head(self.body(x))
            finally:
                inside["net"] = False

    def build(seed: int) -> Case:
        torch.manual_seed(seed)
        return Case("flaky_local", Net(), classification_loss, _data(seed, 32, (8,), 3))

    return build


def scenario_identical(rank: int) -> dict[str, Any]:
    import torch

    from zoo import CORRECT, assert_same_state, training_state

    reports = {}
    # with the suspect (the attention op) found and checked locally on every check step too
    for name, build in (("mlp_relu_dropout", CORRECT["mlp_relu_dropout"]), ("attention", attention_case)):
        states = []
        for watch in (None, dict(every_n_steps=2, max_overhead=None, on_failure="raise")):
            torch.manual_seed(1234 + rank)  # dropout masks differ per rank and depend on the RNG stream
            model, opt, gw = train(build, steps=5, watch=watch, optimizer="adam")
            state = training_state(model, opt)
            states.append({k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in state.items()})
            if gw is not None:
                reports[name] = [r.verdict for _, r in gw.reports]
        assert_same_state(states[0], states[1])
    # a GradScaler's scaled backward: the recorded gradients and loss are unscaled before the check
    scaled = train(CORRECT["layernorm_gelu"], steps=2, watch=dict(every_n_steps=1, max_overhead=None), scale=1024.0)[2]
    # the same with a custom Function's module-local check: its records' gradients stay as scaled as their grad_out
    scaled_local = train(CORRECT["custom_function"], steps=2, watch=dict(every_n_steps=1, max_overhead=None), scale=1024.0)[2]
    # under the default overhead budget every rank checks the same steps (rank zero's clock decides)
    budgeted = train(CORRECT["layernorm_gelu"], steps=12, watch=dict(every_n_steps=1, max_overhead=0.5))[2]
    return {"identical": True, "verdicts": reports, "scaled": [r.verdict for _, r in scaled.reports],
            "scaled_local": [(r.verdict, sorted(n for n in r.tensors if "::" in n)) for _, r in scaled_local.reports],
            "budgeted": [[step, [p.kind for p in r.probes], r.verdict] for step, r in budgeted.reports]}


def scenario_raise(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    from gradwatch import GradientCheckError
    from zoo import BUGS, CORRECT, classification_loss

    out: dict[str, Any] = {}

    def flaky(model, batch):  # raises inside the check on rank 1 only
        if rank == 1:
            raise ZeroDivisionError("planted failure on rank 1")
        return classification_loss(model, batch)

    # modules=None: loss_fn first runs inside the whole-model check; "suspects" (the default): first in
    # the forward that finds the suspects (which says so and finds none on rank 1), then in the check
    for key, modules in (("flaky", None), ("flaky_suspects", "suspects")):
        try:
            train(CORRECT["custom_function"], steps=2, loss_fn=flaky,
                  watch=dict(every_n_steps=1, max_overhead=None, modules=modules))
            out[key] = None
        except Exception as err:  # noqa: BLE001 - recorded for the test
            out[key] = [type(err).__name__, str(err)]
        dist.barrier()  # both ranks left the check: the group still works
    try:
        train(BUGS["wrong_sign"], steps=1, watch=dict(every_n_steps=1, max_overhead=None, on_failure="raise"))
        out["raise"] = None
    except GradientCheckError as err:
        out["raise"] = type(err).__name__
    # a module-local check that raises on rank 1 only: that module is skipped on both ranks, saying so,
    # the next module is checked, and training goes on
    out["flaky_local"] = summary(train(flaky_local_case(rank), steps=2,
                                       watch=dict(every_n_steps=1, max_overhead=None, modules=["body", "head"]))[2])
    # tensor-parallel DTensor parameters (no fully_shard unit manages them): refused, saying what to use
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from gradwatch import GradWatch

    tp = parallelize_module(nn.Linear(4, 4), init_device_mesh("cpu", (2,)), ColwiseParallel())
    try:
        GradWatch(tp, classification_loss)
        out["tensor_parallel"] = None
    except ValueError as err:
        out["tensor_parallel"] = str(err)
    return out


def main(out: pathlib.Path, scenario: str) -> None:
    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        result = globals()[f"scenario_{scenario}"](rank)
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.barrier()
        dist.destroy_process_group()  # not left to static destruction at exit


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    main(target, sys.argv[2])
    # the results are written and the group destroyed: skip static destruction, where gloo's threads
    # once ended a finished rank with "terminate called without an active exception" (CI under load)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

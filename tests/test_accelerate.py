"""A fourth adapter written against the watch core: a hand-written loop that calls
``accelerate.Accelerator.backward``. The adapter (``AcceleratedWatch``, the first 50 lines
below) is framework glue only: when to check, and which gradient; the core
(:mod:`gradwatch._watch`) does the check step. It catches every planted zoo bug with the
same numbers as :class:`gradwatch.GradWatch`."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import pytest
import torch

import gradwatch
from gradwatch._watch import _BackwardRoots, _Capture, _Watch
from gradwatch.replay import capture
from zoo import BUGS, CORRECT

accelerate = pytest.importorskip("accelerate")


class AcceleratedWatch:
    """``with watch.step(batch): accelerator.backward(loss)``, every argument of :class:`_Watch` taken as is."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, loss_fn: Any, **options: Any) -> None:
        self.accelerator, self.model, self.loss_fn = accelerator, model, loss_fn
        self.core = _Watch(**options)
        self.steps = 0

    @contextmanager
    def step(self, batch: Any) -> Iterator[None]:
        step, self.steps = self.steps, self.steps + 1
        multi = self.accelerator.num_processes > 1
        if not self.core.begin(step, defer=not multi):  # when: a clock read on other steps
            yield
            return
        model = self.accelerator.unwrap_model(self.model)
        replay = capture(model)  # right before the forward: dropout masks and batch statistics replay
        targets = self.core.targets(model, self.loss_fn, batch, replay, distributed=multi)
        recording = self.core.recording(model, targets, ops=not multi)
        grads: dict[str, torch.Tensor] = {}  # which gradient: what this backward sends to each parameter
        hooks = [p.register_hook(partial(_keep, grads, n)) for n, p in model.named_parameters() if p.requires_grad]
        roots = _BackwardRoots()  # the loss accelerator.backward is called on
        try:
            with roots, recording:
                yield
        finally:
            for hook in hooks:
                hook.remove()
        scaler = self.accelerator.scaler
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        self.core.check_step(_Capture(step, model, self.loss_fn, batch, replay, grads, roots.loss(),
                                      recording=recording, scale=scale, distributed=multi, average=multi))


def _keep(grads: dict[str, torch.Tensor], name: str, grad: torch.Tensor) -> None:
    grads[name] = grad.detach() if name not in grads else grads[name] + grad.detach()


# ----------------------------------------------------------------------------- tests
def _train(case: Any, watch_of: Any, steps: int = 2) -> Any:
    accelerator = accelerate.Accelerator(cpu=True)
    model = case.model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    watch = watch_of(accelerator, model)
    for _ in range(steps):
        optimizer.zero_grad()
        with watch.step(case.batch):
            accelerator.backward(case.loss_fn(model, case.batch))
        optimizer.step()
    return watch


def _numbers(reports: list) -> list:
    return [(step, r.verdict, sorted(t.name for t in r.failures), [(p.autograd, p.numerical) for p in r.probes])
            for step, r in reports]


@pytest.mark.parametrize("name", sorted(BUGS) + ["mlp_relu_dropout", "cnn_bn_pool"])
def test_a_fourth_adapter_catches_the_zoo_with_the_numbers_of_gradwatch(name: str) -> None:
    build = BUGS.get(name) or CORRECT[name]
    options = dict(every_n_steps=1, max_overhead=None, seed=5, on_failure=lambda report: None)
    torch.manual_seed(0)
    mine = build(0)
    ours = _train(mine, lambda acc, model: AcceleratedWatch(acc, model, mine.loss_fn, **options))
    torch.manual_seed(0)
    case = build(0)
    plain = _train(case, lambda acc, model: gradwatch.GradWatch(model, case.loss_fn, **options))
    assert _numbers(ours.core.reports) == _numbers(plain.reports)
    for _, report in ours.core.reports:
        whole = {t.name for t in report.failures if "::" not in t.name}
        assert whole == case.wrong, str(report)  # every planted bug named, and the correct models quiet


def test_the_adapter_is_a_page_of_glue() -> None:
    import inspect

    source = inspect.getsource(AcceleratedWatch) + inspect.getsource(_keep)
    assert len(source.splitlines()) < 80

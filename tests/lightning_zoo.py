"""LightningModule wrappers around the zoo in ``zoo.py``, for the callback tests, in
either Lightning namespace (``pytorch_lightning`` or ``lightning.pytorch``).

Example:
    >>> from zoo import CORRECT
    >>> module = ZooModule(CORRECT["layernorm_gelu"](0))  # the pytorch_lightning one
    >>> len(loader(module.case, batches=2, seed=0))
    2
    >>> lit = api("lightning.pytorch")
    >>> isinstance(lit.ZooModule(CORRECT["layernorm_gelu"](0)), lit.pl.LightningModule)
    True
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from zoo import Case

__all__ = ["NAMESPACES", "ZooModule", "api", "attention_case", "loader", "trainer_kwargs"]

#: The two namespaces Lightning ships under.
NAMESPACES = ("pytorch_lightning", "lightning.pytorch")


class _ZooMethods:
    """Trains ``case.model`` on ``case.loss_fn``; logs its loss like a typical module does.

    Parameter names get the prefix ``net.``; :attr:`wrong` holds the planted-bug tensors
    under those names. Mixed with a namespace's ``LightningModule`` by :func:`api`.
    """

    def __init__(self, case: Case, *, lr: float = 1e-2, returns: str = "tensor") -> None:
        super().__init__()
        self.case = case
        self.net = case.model
        self.lr = lr
        self.returns = returns
        self.wrong = {f"net.{n}" for n in case.wrong}

    def loss(self, module: Any, batch: Any) -> torch.Tensor:
        return self.case.loss_fn(module.net, batch)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.case.loss_fn(self.net, batch)
        self.log("train_loss", loss, prog_bar=True)
        self.log_dict({"batch_idx": float(batch_idx)})
        return {"loss": loss, "extra": loss.detach()} if self.returns == "dict" else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@functools.cache
def api(namespace: str = "pytorch_lightning") -> SimpleNamespace:
    """A namespace's classes the tests use, and :class:`ZooModule` built on its ``LightningModule``.

    ``lit.mixin(Cls)`` builds a test's own module class (a mixin over ``ZooModule``) in it.
    """
    pl = importlib.import_module(namespace)
    zoo_module = type("ZooModule", (_ZooMethods, pl.LightningModule), {"__module__": __name__,
                                                                       "__doc__": _ZooMethods.__doc__})
    return SimpleNamespace(
        name=namespace,
        pl=pl,
        ZooModule=zoo_module,
        mixin=functools.cache(lambda cls, base=None: type(cls.__name__, (cls, base or zoo_module), {})),
        Trainer=pl.Trainer,
        Callback=pl.Callback,
        loggers=importlib.import_module(f"{namespace}.loggers"),
        plugins=importlib.import_module(f"{namespace}.plugins"),
        callbacks=importlib.import_module(f"{namespace}.callbacks"),
        strategies=importlib.import_module(f"{namespace}.strategies"),
    )


ZooModule = api("pytorch_lightning").ZooModule


def loader(case: Case, *, batches: int, seed: int = 0) -> DataLoader:
    """``batches`` different batches shaped like ``case.batch`` (floats ~ N(0, 1), integers in range)."""
    g = torch.Generator().manual_seed(seed)
    columns = []
    for t in case.batch:
        shape = (batches * t.shape[0], *t.shape[1:])
        if t.is_floating_point():
            columns.append(torch.randn(shape, generator=g, dtype=t.dtype))
        else:
            columns.append(torch.randint(0, int(t.max()) + 1, shape, generator=g, dtype=t.dtype))
    return DataLoader(TensorDataset(*columns), batch_size=case.batch[0].shape[0], shuffle=False)


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    """Quiet, CPU, few-step Trainer arguments."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
    )
    kwargs.update(overrides)
    return kwargs


def attention_case(seed: int) -> Case:
    """:class:`tests._attn_op.AttnNet` (a custom attention op, no float64 kernel) as a zoo case; its
    backward's planted bug is set with ``tests._attn_op.BUG``."""
    from tests._attn_op import AttnNet
    from zoo import classification_loss

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return Case("attention", AttnNet(), classification_loss,
                (torch.randn(3, 4, 6, generator=g), torch.randint(0, 3, (3,), generator=g)))

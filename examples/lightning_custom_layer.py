"""Train a Lightning model whose hand-written RMSNorm backward has a planted bug.

``FusedRMSNorm`` is written the way custom kernels are: ``forward`` computes
``x / rms(x) * weight`` and ``backward`` returns hand-derived gradients. The planted bug
is a classic one: the input gradient treats ``rms(x)`` as a constant and drops the term
that flows through the normalisation. Training still runs and the loss still falls, so
nothing looks wrong; the layer *before* the norm gets a wrong gradient. One line,
``callbacks=[GradWatchCallback(...)]``, catches it and names the tensor and element.

The data set is generated: three interleaved noisy spirals (3000 points, 3 classes).
The trainer logs to ``lightning_logs/`` (TensorBoard), gradwatch's keys included.

Run:
    python examples/lightning_custom_layer.py            # catches the planted bug
    python examples/lightning_custom_layer.py --fixed    # the correct backward passes
    tensorboard --logdir lightning_logs
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradwatch import Report
from gradwatch.lightning import GradWatchCallback


class FusedRMSNormFn(torch.autograd.Function):
    """``x / sqrt(mean(x²) + eps) * weight`` over the last dimension, hand-written backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, planted_bug):
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x_hat = x / rms
        ctx.save_for_backward(x_hat, rms, weight)
        ctx.planted_bug = planted_bug
        return x_hat * weight

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, rms, weight = ctx.saved_tensors
        grad_weight = (grad_out * x_hat).reshape(-1, x_hat.shape[-1]).sum(0)
        grad_x_hat = grad_out * weight
        if ctx.planted_bug:
            grad_x = grad_x_hat / rms  # the planted bug: rms(x) treated as a constant
        else:
            grad_x = (grad_x_hat - x_hat * (grad_x_hat * x_hat).mean(-1, keepdim=True)) / rms
        return grad_x, grad_weight, None, None


class FusedRMSNorm(nn.Module):
    def __init__(self, dim: int, planted_bug: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.planted_bug = planted_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FusedRMSNormFn.apply(x, self.weight, self.eps, self.planted_bug)


class SpiralClassifier(pl.LightningModule):
    def __init__(self, planted_bug: bool, lr: float = 3e-3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(2, 64), FusedRMSNorm(64, planted_bug), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(64, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 3)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(1) == y).float().mean())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def spirals(n: int, classes: int, seed: int) -> TensorDataset:
    """``classes`` interleaved noisy spiral arms in 2-D, ``n`` points in all."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, classes, n)
    r = rng.uniform(0.05, 1.0, n)
    angle = label * 2 * math.pi / classes + r * 3.5 + rng.normal(scale=0.15, size=n)
    xy = np.stack([r * np.cos(angle), r * np.sin(angle)], 1)
    return TensorDataset(torch.tensor(xy, dtype=torch.float32), torch.tensor(label))


def main(argv: list[str] | None = None) -> GradWatchCallback:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--every", type=int, default=50, help="check every N steps (default 50)")
    parser.add_argument("--root", default=".", help="directory that gets lightning_logs/ (default .)")
    parser.add_argument("--fixed", action="store_true", help="use the correct backward")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    pl.seed_everything(args.seed, verbose=False)
    data = spirals(3000, 3, args.seed)
    failures: list[Report] = []
    # max_overhead=None: a demonstration, so every check probes every tensor; in real
    # training keep the default budget (2% of the training time, spent in turn over the tensors)
    callback = GradWatchCallback(
        every_n_steps=args.every, max_overhead=None, seed=args.seed, on_failure=failures.append
    )
    logger = TensorBoardLogger(args.root, name="lightning_logs")
    trainer = pl.Trainer(
        max_steps=args.steps, accelerator="cpu", devices=1, logger=logger, callbacks=[callback],
        log_every_n_steps=10, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    model = SpiralClassifier(planted_bug=not args.fixed)
    trainer.fit(model, DataLoader(data, batch_size=128, shuffle=True))

    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    checks = len(callback.reports)
    if failures:
        print(
            f"gradwatch: FAIL in {len(failures)} of {checks} checks - {failures[0].failures[0].short_message} "
            f"(accuracy {accuracy:.1%})"
        )
    else:
        print(f"gradwatch: PASS in all {checks} checks (accuracy {accuracy:.1%})")
    print(f"view the logs: tensorboard --logdir {logger.root_dir}")
    return callback


if __name__ == "__main__":
    main(sys.argv[1:])

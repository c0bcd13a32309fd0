"""Shared pieces of the speed and memory benchmarks: the two small models, batches, timing."""

from __future__ import annotations

import os
import platform
import shlex
import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "ManySmall", "add_common_args", "batches", "build", "classification_loss", "header", "sync"]


class SmallCNN(nn.Module):
    """A LeNet-style CNN for 32x32 RGB images (CIFAR-10 sized), 0.14M parameters in 8 tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallTransformer(nn.Module):
    """Token classifier: embedding, 2 pre-norm encoder layers (d=64, 4 heads, dropout 0.1), mean pool;
    74k parameters in 27 tensors."""

    def __init__(self, vocab: int = 100) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class _Bottleneck(nn.Module):
    """A residual bottleneck block: ``x + Linear(16, 256)(tanh(Linear(256, 16)(x)))``."""

    def __init__(self, width: int = 256, inner: int = 16) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(width, inner), nn.Linear(inner, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.tanh(self.down(x)))


class ManySmall(nn.Module):
    """Many small tensors behind a wide trunk: Linear(384, 2048), tanh, Linear(2048, 256), ``blocks``
    bottleneck blocks and a 10-way head; 150 blocks: 606 tensors, 2.6M parameters."""

    def __init__(self, blocks: int = 150, width: int = 2048) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(384, width), nn.Tanh(), nn.Linear(width, 256))
        self.blocks = nn.Sequential(*(_Bottleneck() for _ in range(blocks)))
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.trunk(x)))


def _small_mlp() -> nn.Module:
    """A small MLP (32 -> 64 -> 64 -> 10, GELU, LayerNorm), 7.1k parameters in 8 tensors: Python overhead dominates."""
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)
    )


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _cnn_batch(g: torch.Generator, device: str):
    return torch.randn(32, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (32,), generator=g).to(device)


def _transformer_batch(g: torch.Generator, device: str):
    return torch.randint(0, 100, (16, 32), generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device)


def _mlp_batch(g: torch.Generator, device: str):
    return torch.randn(64, 32, generator=g).to(device), torch.randint(0, 10, (64,), generator=g).to(device)


#: name -> (model class, batch maker); batch: CNN 32 images 3x32x32, transformer 16 sequences of 32 tokens,
#: MLP 64 vectors of 32
MODELS = {"cnn": (SmallCNN, _cnn_batch), "transformer": (SmallTransformer, _transformer_batch),
          "mlp": (_small_mlp, _mlp_batch)}


def batches(name: str, n: int, device: str, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [MODELS[name][1](g, device) for _ in range(n)]


def build(name: str, device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]().to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: timings on a shared machine are steadier)")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(args) -> None:
    """Print the reproducing command and the machine."""
    torch.set_num_threads(args.threads)
    print("# command: python " + " ".join(shlex.quote(a) for a in sys.argv))
    device = args.device
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name()
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    print(f"# machine: {device} ({name}), {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {load}")

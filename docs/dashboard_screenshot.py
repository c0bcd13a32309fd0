"""Regenerate docs/dashboard.png, the README's screenshot of the TensorBoard dashboard.

Trains a small 12-layer Transformer encoder (150 parameter tensors) with a planted bug:
a tensor hook that scales the gradient of one layer's second feed-forward weight by 1.5,
as a hand-written backward that forgets a factor would. A GradWatch hook logs to a
temporary logdir; TensorBoard serves it on loopback and headless Chromium photographs
the Custom Scalars tab. Not part of CI; needs a ``chromium`` binary (on Debian:
``apt-get install chromium``).

Run:
    OMP_NUM_THREADS=1 python docs/dashboard_screenshot.py            # writes docs/dashboard.png
    python docs/dashboard_screenshot.py --out /tmp/d.png --steps 100 --every 20
"""

from __future__ import annotations

import argparse
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from tensorboard import program
from torch import nn

import gradwatch

__all__ = ["main"]

#: The tensor whose gradient the planted hook scales.
BUGGY = "encoder.layers.7.linear2.weight"


class _Model(nn.Module):
    """Token embedding, a 12-layer pre-norm Transformer encoder (d=16, GELU: no kinks, so the
    check runs batched with ``kinks=False``), a classifier head."""

    def __init__(self, vocab: int = 32, d: int = 16, layers: int = 12, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def _loss(model: nn.Module, batch) -> torch.Tensor:
    tokens, labels = batch
    return F.cross_entropy(model(tokens), labels)


def train(logdir: str, steps: int, every: int) -> gradwatch.GradWatch:
    """Train the model with the planted hook, GradWatch logging to ``logdir``."""
    torch.manual_seed(0)
    model = _Model()
    dict(model.named_parameters())[BUGGY].register_hook(lambda g: g * 1.5)
    tokens = torch.randint(0, 32, (256, 8))
    labels = tokens[:, 0] % 4  # learnable: the class is the first token's residue
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    watch = gradwatch.GradWatch(model, _loss, every_n_steps=every, max_overhead=None, logdir=logdir,
                                options=gradwatch.ProbeOptions(coordinates=2, directions=1, kinks=False),
                                on_failure=lambda report: None, seed=0)
    with watch:
        for step in range(steps):
            i = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            with watch.step((tokens[i], labels[i])):
                _loss(model, (tokens[i], labels[i])).backward()
            optimizer.step()
    return watch


#: Served first, on TensorBoard's origin: turns off "Ignore outliers in chart scaling" (a
#: setting TensorBoard keeps in localStorage only, not in the URL), then opens the tab.
_SETUP = """<!doctype html><script>
localStorage.setItem("_ignoreYOutliers", "false");
location.replace("/#TAB&_smoothingWeight=0");
</script>"""


def _serve_through(tensorboard: str) -> str:
    """A loopback proxy in front of ``tensorboard`` that also serves ``/gradwatch-setup``
    (:data:`_SETUP`); returns its URL. Serves from a daemon thread until the script exits."""

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _forward(self, body: bytes | None) -> None:
            if self.path.startswith("/gradwatch-setup"):
                tab = self.path.partition("?")[2] or "custom_scalars"
                data, status, headers = _SETUP.replace("TAB", tab).encode(), 200, {"Content-Type": "text/html"}
            else:
                request = urllib.request.Request(tensorboard + self.path, data=body, method=self.command,
                                                 headers={k: v for k, v in self.headers.items() if k != "Host"})
                try:
                    with urllib.request.urlopen(request, timeout=120) as response:
                        data, status, headers = response.read(), response.status, dict(response.headers)
                except urllib.error.HTTPError as error:
                    data, status, headers = error.read(), error.code, dict(error.headers)
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's names)
            self._forward(None)

        def do_POST(self) -> None:  # noqa: N802
            self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> Path:
    """Train, serve, photograph; return the PNG's path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("dashboard.png")), help="PNG to write")
    parser.add_argument("--steps", type=int, default=101, help="training steps (default 101)")
    parser.add_argument("--every", type=int, default=20, help="check every N steps (default 20)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="browser binary")
    parser.add_argument("--size", default="1600,1500",
                        help="window size WIDTH,HEIGHT (default 1600,1500: the main category and a module's)")
    parser.add_argument("--tab", default="custom_scalars", choices=["custom_scalars", "histograms", "text"],
                        help="TensorBoard tab to photograph (default custom_scalars)")
    parser.add_argument("--budget-ms", type=int, default=20000, help="virtual time for the page to render")
    parser.add_argument("--logdir", help="train into this directory and keep it (default: a temporary one); "
                                         "when it already holds the run, photograph it without training")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="gradwatch-dashboard-") as tmp:
        logdir = Path(args.logdir) if args.logdir else Path(tmp) / "logs"
        if not (logdir / "transformer_12_layers").is_dir():
            watch = train(str(logdir / "transformer_12_layers"), args.steps, args.every)
            report = watch.last_report
            print(f"{len(report.tensors)} tensors; last check: {report.summary()}", file=sys.stderr)
        tb = program.TensorBoard()
        tb.configure(argv=[None, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0",
                           "--load_fast", "false", "--reload_interval", "0", "--reload_task", "blocking"])
        url = _serve_through(tb.launch().rstrip("/"))  # both serve from daemon threads until the script exits
        cmd = [
            args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={Path(tmp) / 'chromium'}", f"--window-size={args.size}", "--hide-scrollbars",
            f"--virtual-time-budget={args.budget_ms}", f"--screenshot={out}",
            f"{url}/gradwatch-setup?{args.tab}",  # raw values (no smoothing), every point in the y range
        ]
        print(" ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, timeout=180, stdout=subprocess.DEVNULL)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

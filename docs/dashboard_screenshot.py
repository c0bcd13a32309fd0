"""Regenerate docs/dashboard.png, the README's screenshot of the TensorBoard dashboard.

Trains the planted-bug demo (:func:`gradwatch.demo.run`: a custom ``autograd.Function``
whose bias gradient is a mean instead of a sum) with a GradWatch hook logging to a
temporary logdir, serves it with TensorBoard on loopback, and photographs the Custom
Scalars tab with headless Chromium. Not part of CI; needs a ``chromium`` binary (on
Debian: ``apt-get install chromium``).

Run:
    OMP_NUM_THREADS=1 python docs/dashboard_screenshot.py            # writes docs/dashboard.png
    python docs/dashboard_screenshot.py --out /tmp/d.png --steps 200 --every 10
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard import program

from gradwatch import demo

__all__ = ["main"]


def main(argv: list[str] | None = None) -> Path:
    """Train, serve, photograph; return the PNG's path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("dashboard.png")), help="PNG to write")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--every", type=int, default=10, help="check every N steps (default 10)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="browser binary")
    parser.add_argument("--size", default="1600,1000",
                        help="window size WIDTH,HEIGHT (default 1600,1000: the 9 charts of the main category)")
    parser.add_argument("--tab", default="custom_scalars", choices=["custom_scalars", "histograms", "text"],
                        help="TensorBoard tab to photograph (default custom_scalars)")
    parser.add_argument("--budget-ms", type=int, default=15000, help="virtual time for the page to render")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory(prefix="gradwatch-dashboard-") as tmp:
        logdir = Path(tmp) / "logs"
        demo.run(steps=args.steps, every=args.every, logdir=str(logdir / "planted_bug"))
        tb = program.TensorBoard()
        tb.configure(argv=[None, "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0",
                           "--load_fast", "false", "--reload_interval", "0", "--reload_task", "blocking"])
        url = tb.launch()  # serves from a daemon thread until this script exits
        cmd = [
            args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={Path(tmp) / 'chromium'}", f"--window-size={args.size}", "--hide-scrollbars",
            f"--virtual-time-budget={args.budget_ms}", f"--screenshot={out}",
            f"{url}#{args.tab}&_smoothingWeight=0",  # raw values, not smoothed
        ]
        print(" ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, timeout=120, stdout=subprocess.DEVNULL)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

"""Pieces shared by the multi-process test scripts (``lightning_ddp.py``, ``lightning_fsdp.py``,
``hf_ddp.py``): a check made to raise on one rank, and each rank's results written before the
process group is torn down."""

from __future__ import annotations

import json
import pathlib
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["error_of", "finish", "raising"]


@contextmanager
def raising(module: Any, name: str, *, active: bool, message: str) -> Iterator[None]:
    """``module.name`` replaced, where ``active``, by a function raising ``RuntimeError(message)``."""
    real = getattr(module, name)

    def planted(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(message)

    if active:
        setattr(module, name, planted)
    try:
        yield
    finally:
        setattr(module, name, real)


def error_of(run: Callable[[], Any]) -> str | None:
    """The message of the ``RuntimeError`` ``run()`` raised, None if it returned."""
    try:
        run()
    except RuntimeError as err:
        return str(err)
    return None


def finish(out: pathlib.Path, rank: int, result: dict[str, Any]) -> None:
    """Write ``OUTDIR/rank<r>.json`` and tear the gloo group down before the interpreter exits
    (a group left to static destruction can abort a rank at exit)."""
    import torch

    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

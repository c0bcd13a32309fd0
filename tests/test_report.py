"""Report rendering: the text of ``str(report)``."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.engine import check


def test_str_header_keeps_its_columns_apart_when_names_are_shorter_than_tensor() -> None:
    """12.11: a model whose parameter names are shorter than "tensor" printed "tensorverdict"."""
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.tensor([1.0, 2.0, 3.0])
    lines = str(check(model, lambda m, b: (m.w * b).sum() ** 2, x, seed=0)).splitlines()
    header, row = lines[1], lines[2]
    assert header.split() == ["tensor", "verdict", "rel_error", "error_bar", "err/tol", "probes", "kinks"]
    assert row.split()[:2] == ["w", "pass"]
    assert header.index("verdict") == row.index("pass")  # the columns line up

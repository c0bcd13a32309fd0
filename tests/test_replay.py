"""Capturing and restoring the state a training forward started from."""

from __future__ import annotations

import random
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch import capture
from gradwatch.replay import _cast_floats, _isolated, _restore_attrs, _restore_rng


def test_rng_streams_are_rewound() -> None:
    state = capture(nn.Linear(2, 2))
    first = (torch.rand(3), np.random.rand(), random.random())
    _restore_rng(state.rng)
    second = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_buffers_are_copied_not_aliased() -> None:
    bn = nn.BatchNorm1d(3)
    state = capture(bn)
    bn(torch.randn(8, 3))
    assert state.buffers["num_batches_tracked"].item() == 0
    assert torch.equal(state.buffers["running_mean"], torch.zeros(3))


def test_attribute_bindings_are_restored() -> None:
    m = nn.Linear(2, 2)
    m.counter = 1
    state = capture(m)
    m.counter = 2
    m.extra = "new"
    _restore_attrs(state.attrs)
    assert m.counter == 1 and not hasattr(m, "extra")


def test_autocast_state_is_captured() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = capture(nn.Linear(2, 2))
    assert state.autocast["cpu"] == (True, torch.bfloat16)
    assert capture(nn.Linear(2, 2)).autocast["cpu"][0] is False


def test_isolated_restores_on_error() -> None:
    m = nn.Linear(2, 2)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        with _isolated(m):
            torch.rand(5)
            m.flag = True
            raise RuntimeError
    assert torch.equal(before, torch.get_rng_state()) and not hasattr(m, "flag")


def test_cast_floats_walks_containers_and_keeps_integers() -> None:
    Pair = namedtuple("Pair", "x y")
    batch = {"a": [torch.ones(2), (torch.arange(3),)], "b": Pair(torch.zeros(1, dtype=torch.float16), 3)}
    out = _cast_floats(batch, torch.float64)
    assert out["a"][0].dtype == torch.float64
    assert out["a"][1][0].dtype == torch.int64
    assert isinstance(out["b"], Pair) and out["b"].x.dtype == torch.float64 and out["b"].y == 3
    assert batch["a"][0].dtype == torch.float32  # the input is not modified


def test_capture_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module, got int"):
        capture(3)

"""Capturing and restoring the state a training forward started from."""

from __future__ import annotations

import random
from collections import namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch import capture
from gradwatch.replay import _autocast, _cast_floats, _isolated, _restore_attrs, _restore_rng


def test_rng_streams_are_rewound() -> None:
    state = capture(nn.Linear(2, 2))
    first = (torch.rand(3), np.random.rand(), random.random())
    _restore_rng(state.rng)
    second = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


@pytest.mark.parametrize("cached_gaussian", [False, True])
def test_numpy_stream_is_rewound_after_any_draw_and_left_alone_without_one(cached_gaussian: bool) -> None:
    # the restore is skipped when NumPy's state provably did not move (a byte comparison
    # instead of set_state's word-by-word copy); a cached Gaussian is always restored
    np.random.seed(0)
    if cached_gaussian:
        np.random.standard_normal()  # draws two, caches one: the next draw moves no key or position
    state = capture(nn.Linear(2, 2))
    assert state.rng.numpy[3] == int(cached_gaussian)
    for draw in (np.random.rand, np.random.standard_normal, lambda: np.random.randint(0, 1000, 5).tolist(), None):
        _restore_rng(state.rng)
        first = draw() if draw else np.random.rand()
        _restore_rng(state.rng)
        _restore_rng(state.rng)  # nothing drawn in between
        assert (draw() if draw else np.random.rand()) == first
    _restore_rng(state.rng)
    after = np.random.get_state()
    assert after[2:] == state.rng.numpy[2:] and np.array_equal(after[1], state.rng.numpy[1])


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


def test_autocast_context_sets_the_captured_state_and_none_turns_it_off() -> None:
    on = {"cpu": (True, torch.bfloat16), "cuda": (False, torch.float16)}
    with _autocast(on):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _autocast(None):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    with _autocast(None):  # already off: nothing entered
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


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


def test_attribute_bindings_are_restored_when_only_values_or_order_changed() -> None:
    # the restore skips a module whose bindings are all the same objects in the same order;
    # the same names rebound, or deleted and bound again in another order, are still put back
    m = nn.Linear(2, 2)
    first, second = object(), object()
    m.a, m.b = first, second
    state = capture(m)
    _restore_attrs(state.attrs)  # nothing changed: nothing to do
    assert m.a is first and m.b is second
    m.a = object()  # the same names, another object
    _restore_attrs(state.attrs)
    assert m.a is first and m.b is second
    del m.a, m.b
    m.b, m.a = first, second  # the same names and objects, swapped, in another order
    _restore_attrs(state.attrs)
    assert m.a is first and m.b is second


def test_default_dtype_context_restores_on_exit_and_error() -> None:
    from gradwatch.replay import _DefaultDtype

    before = torch.get_default_dtype()
    with _DefaultDtype(torch.float64):
        assert torch.zeros(1).dtype == torch.float64
    assert torch.get_default_dtype() == before
    with pytest.raises(RuntimeError):
        with _DefaultDtype(torch.float64):
            raise RuntimeError
    assert torch.get_default_dtype() == before

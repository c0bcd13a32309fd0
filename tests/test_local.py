"""Module-local checks (gradwatch.local): check_module, register_reference, the recorder and
GradWatch(modules=...)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.local import _REFERENCES_BY_CLASS, _check_record, _Recording
from tests._attn_op import BUG, FusedAttention, reference_attention


@pytest.fixture
def bug():
    """Set the planted bug of the attention op's backward; always reset afterwards."""
    def plant(mode):
        BUG["mode"] = mode
    yield plant
    BUG["mode"] = None


@pytest.fixture
def reference():
    gradwatch.register_reference(FusedAttention, reference_attention)
    yield
    _REFERENCES_BY_CLASS.pop(FusedAttention, None)


def _qkv(seed, shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).requires_grad_(True) for _ in range(3))


def test_check_module_names_the_input_of_a_planted_backward_bug(bug):
    for mode, wrong in [("dq", "attn::input[0]"), ("dk", "attn::input[1]")]:
        bug(mode)
        report = gradwatch.check_module(FusedAttention(), _qkv(0), name="attn", seed=0)
        assert [t.name for t in report.failures] == [wrong], (mode, str(report))
        assert f"'{wrong}'[" in report.failures[0].message  # names the element
        # the op has no float64 kernel: checked in its own precision, and says so
        assert report.precision == "native" and "NotImplementedError" in report.precision_reason


def test_reference_comparison_names_module_and_quantity(bug, reference):
    bug("dk")
    report = gradwatch.check_module(FusedAttention(), _qkv(1), name="attn", seed=0)
    failed = [r.name for r in report.reference_failures]
    assert failed == ["attn::input[1]"]
    assert not report.ok and report.verdict == "fail"
    keys = gradwatch.metrics(report)
    assert keys["gradwatch/reference_error_ratio/attn::input[1]"] > 1
    assert keys["gradwatch/reference_error_ratio/attn::output[0]"] < 1  # the forward is right
    assert "attn::input[1]" in str(report) and "reference" in str(report)
    # the reference ran in float64 although the op has no float64 kernel
    assert all(r.precision == "float32 vs reference float64" for r in report.references)

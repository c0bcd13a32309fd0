"""Argument validation shared by the public entry points (private)."""

from __future__ import annotations

import math
from typing import Any

__all__: list[str] = []


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0) or math.isinf(value):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")
    return float(value)


def _fraction_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise ValueError(f"`{name}` must be None or a fraction in (0, 1] such as 0.02, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}")
    return value


def _seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be None or a non-negative int, got {value!r}")
    return value


def _one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _module(name: str, value: Any) -> Any:
    from torch import nn

    if not isinstance(value, nn.Module):
        raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(value).__name__}")
    return value


def _callable(name: str, value: Any) -> Any:
    if not callable(value):
        raise TypeError(f"`{name}` must be callable, got {type(value).__name__} {value!r}")
    return value


def _argparse_type(check: Any, convert: Any = str) -> Any:
    """An argparse ``type=`` from a validator: ``convert`` the text (kept as text when
    that fails, so the error shows what was typed), then ``check`` it; a validation error
    becomes argparse's usage error (exit status 2) with the validator's message.

    Example:
        >>> import functools
        >>> _argparse_type(functools.partial(_positive_int, "steps"), int)("3")
        3
    """
    import argparse

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = text
        try:
            return check(value)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse

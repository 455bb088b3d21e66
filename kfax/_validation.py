"""Checks of user options, made once when a transform is built, with errors that name the option.

Options may arrive as Python numbers, NumPy scalars, concrete JAX arrays, schedules, or (under
``optax.inject_hyperparams``) traced arrays: traced values cannot be checked and pass through.
Knows nothing of curvature.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import numpy as np

TRACED = object()  # what `concrete` returns for a value only known when the program runs


def concrete(value: Any) -> Any:
    """A Python number for a concrete scalar (number, NumPy or JAX array); ``TRACED`` if
    traced."""
    if isinstance(value, jax.core.Tracer):
        return TRACED
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        if np.ndim(value) != 0:
            return value
        return np.asarray(value).item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(name: str, value: Any, what: str) -> float | None:
    value = concrete(value)
    if value is TRACED:
        return None
    if not _is_number(value):
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    if math.isnan(value):
        raise ValueError(f"{name} must be {what}, got nan.")
    return float(value)


def positive(name: str, value: Any, *, schedule: bool = False, finite: bool = True) -> None:
    """``value > 0`` (and finite), or a schedule where ``schedule`` allows one."""
    if callable(value):
        if schedule:
            return
        raise ValueError(f"{name} must be a number > 0, not a schedule; got {value!r}.")
    what = "a finite number > 0" + (" or a schedule" if schedule else "")
    number = _number(name, value, what)
    if number is not None and (number <= 0 or (finite and math.isinf(number))):
        raise ValueError(f"{name} must be {what}, got {value!r}.")


def non_negative(name: str, value: Any) -> None:
    number = _number(name, value, "a finite number >= 0")
    if number is not None and (number < 0 or math.isinf(number)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")


def in_unit_interval(name: str, value: Any, *, closed_top: bool = False) -> None:
    """``0 <= value < 1`` (``<= 1`` with ``closed_top``)."""
    top = "]" if closed_top else ")"
    number = _number(name, value, f"a number in [0, 1{top}")
    if number is None:
        return
    if not (0 <= number and (number <= 1 if closed_top else number < 1)):
        raise ValueError(f"{name} must be in [0, 1{top}, got {value!r}.")


def count(name: str, value: Any) -> None:
    """A positive integer (a traced integer passes)."""
    value = concrete(value)
    if value is TRACED:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def static_count(name: str, value: Any) -> int | None:
    """A positive integer that sets array shapes: must be concrete."""
    if value is None:
        return None
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} sets array shapes and cannot be a traced value: pass a Python int (with "
            f"optax.inject_hyperparams, list {name!r} in static_args)."
        )
    count(name, value)
    return int(concrete(value))


def integer(name: str, value: Any) -> None:
    value = concrete(value)
    if value is TRACED:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}.")


def choice(name: str, value: Any, allowed: tuple) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")

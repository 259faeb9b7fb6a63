"""Argument checks shared by every constructor: one message per kind of mistake, the argument named.

Each check returns the value (so a constructor can assign through it) and raises ``error`` (``ValueError``
by default; Lightning callbacks pass ``MisconfigurationException``) with what to change.

Example:
    >>> positive_int("every_n_steps", 10)
    10
    >>> positive_number("damping", 0.0)
    Traceback (most recent call last):
    ...
    ValueError: `damping` must be a positive finite number, got 0.0.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_ntk.estimators import TraceEstimator

__all__ = [
    "callback_arguments",
    "non_negative_int",
    "non_negative_number",
    "optional_seed",
    "positive_int",
    "positive_number",
]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(name: str, value: object, error: type[Exception] = ValueError, hint: str = "") -> int:
    """``value`` if it is an int ≥ 1."""
    if not _is_int(value) or value < 1:
        raise error(f"`{name}` must be a positive int, got {value!r}{hint}.")
    return value


def non_negative_int(name: str, value: object, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int ≥ 0."""
    if not _is_int(value) or value < 0:
        raise error(f"`{name}` must be a non-negative int, got {value!r}.")
    return value


def positive_number(name: str, value: object, error: type[Exception] = ValueError) -> float:
    """``value`` as a float if it is a finite number > 0."""
    if not _is_number(value) or value <= 0:
        raise error(f"`{name}` must be a positive finite number, got {value!r}.")
    return float(value)


def non_negative_number(name: str, value: object, error: type[Exception] = ValueError) -> float:
    """``value`` as a float if it is a finite number ≥ 0."""
    if not _is_number(value) or value < 0:
        raise error(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


def optional_seed(name: str, value: object, error: type[Exception] = ValueError) -> int | None:
    """``value`` if it is an int or ``None``."""
    if value is not None and not _is_int(value):
        raise error(f"`{name}` must be an int or None, got {value!r}.")
    return value


def callback_arguments(
    *,
    every: Any,
    estimator: Any,
    rule: Any,
    averager: Any,
    on_nonfinite: Any,
    capture: Any,
    seed: Any,
    error: type[Exception] = ValueError,
) -> TraceEstimator:
    """:class:`~lightning_ntk.NTKWeightingCallback`'s arguments checked (``error`` says what to change for the
    first bad one); the estimator they name."""
    from lightning_ntk.averaging import TraceAverager
    from lightning_ntk.estimators import as_estimator
    from lightning_ntk.weights import WeightRule

    positive_int("update_every_n_steps", every, error, hint=" (1 = every optimizer step)")
    for name, value, cls in (("weight_rule", rule, WeightRule), ("trace_averager", averager, TraceAverager)):
        if value is not None and not isinstance(value, cls):
            raise error(f"`{name}` must be a lightning_ntk.{cls.__name__} or None, got {type(value).__name__}.")
    if on_nonfinite not in ("raise", "skip"):
        raise error(f"`on_nonfinite` must be 'raise' or 'skip', got {on_nonfinite!r}.")
    if not isinstance(capture, bool):
        raise error(f"`capture` must be True or False, got {capture!r}.")
    optional_seed("seed", seed, error)
    try:
        return as_estimator(estimator)
    except ValueError as err:
        raise error(f"`estimator`: {err}") from err

"""What every trace estimator returns, and the registry that maps names to estimators."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["ESTIMATORS", "TraceEstimate", "get_estimator", "register_estimator"]


@dataclass(frozen=True)
class TraceEstimate:
    """Estimates of ``Tr K_ii`` for every term.

    Attributes:
        traces: term → 0-dim tensor, on the module's device.
        stderr: term → standard error of the estimate (zero for exact estimators).
        num_rows: term → ``N_i``, the number of residual entries (rows of ``J_i``); used by
            ``mode="mean_trace"``.
        estimator: Name of the estimator that produced it.
        info: Free-form details (e.g. the Jacobian path each term took).
    """

    traces: dict[str, Tensor]
    stderr: dict[str, Tensor]
    num_rows: dict[str, int]
    estimator: str
    info: dict[str, object] = field(default_factory=dict)


Estimator = Callable[..., TraceEstimate]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Register ``fn(module, batch, **options) -> TraceEstimate`` under ``name``."""

    def decorator(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return decorator


def get_estimator(name: str) -> Estimator:
    """Look up an estimator; an unknown name is a ``ValueError`` that lists the known ones."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"Unknown NTK trace estimator {name!r}; choose one of {sorted(ESTIMATORS)}.")
    return ESTIMATORS[name]

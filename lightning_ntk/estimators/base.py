"""What every trace estimator returns, and the registry that maps names to estimators."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from lightning_ntk import tags
from lightning_ntk.contract import check_batch

__all__ = [
    "ESTIMATORS",
    "TraceEstimate",
    "TraceEstimator",
    "as_estimator",
    "get_estimator",
    "register_estimator",
]


Reduce = Callable[[Tensor, str], Tensor]  # (tensor, "sum" | "mean") -> the same tensor combined over ranks


@dataclass(frozen=True)
class TraceEstimate:
    """One measured value per term: an estimate of ``Tr K_ii``, or for ``measure="grad_norm"`` the
    loss-gradient norm ``‖∇_θ L_i‖``.

    Attributes:
        values: term → 0-dim tensor, on the module's device (``traces`` is the same dict, the name
            that reads best where the measurement is known to be an NTK trace).
        stderr: term → standard error of the estimate (zero for exact estimators, NaN where unknown).
        num_rows: term → the number of rows of ``J_i`` (residual entries: points × values per point); used by
            ``mode="mean_trace"``.
        estimator: Name of the estimator that produced it.
        info: Free-form details (e.g. the Jacobian path each term took).
        measure: What was measured, as logged (:data:`lightning_ntk.tags.TRACE` or
            :data:`~lightning_ntk.tags.GRAD_NORM`).
    """

    values: dict[str, Tensor]
    stderr: dict[str, Tensor]
    num_rows: dict[str, int]
    estimator: str
    info: dict[str, object] = field(default_factory=dict)
    measure: str = tags.TRACE

    @property
    def traces(self) -> dict[str, Tensor]:
        """:attr:`values` under the NTK name (``Tr K_ii`` for every estimator except ``grad_norm``)."""
        return self.values

    @property
    def quantity(self) -> str:
        """The measured quantity in words, for messages."""
        return "Loss gradient norm" if self.measure == tags.GRAD_NORM else "NTK trace"

    def reduce(self, names: Sequence[str], reduce: Reduce) -> tuple[Tensor, Tensor, Tensor]:
        """Values, row counts and variances in ``names`` order, combined over ranks by ``reduce``.

        Traces, row counts and variances of independent estimates add up over ranks: the sum is the
        block trace of the NTK of the global batch (the concatenation of the ranks' batches), so a DDP
        run weights its terms like a single device on the same points. One collective for everything.
        """
        values = torch.stack([self.values[name].detach() for name in names])
        rows = row_counts(tuple(self.num_rows[name] for name in names), values)
        variances = torch.stack([self.stderr[name].detach() for name in names]).square()
        packed = reduce(torch.cat([values, rows, variances.to(values)]), "sum")
        return packed.split(len(names))


_ROW_COUNTS: dict[tuple, Tensor] = {}


def row_counts(rows: tuple[int, ...], like: Tensor) -> Tensor:
    """``rows`` as a tensor like ``like``, made once per (rows, device, dtype) and kept: a fresh one
    would be a copy from pageable host memory at every update (a stall on a GPU, illegal in a graph)."""
    key = (rows, like.device, like.dtype)
    out = _ROW_COUNTS.get(key)
    if out is None:
        if len(_ROW_COUNTS) > 256:
            _ROW_COUNTS.clear()
        out = _ROW_COUNTS[key] = torch.tensor(rows, dtype=like.dtype).to(like.device)
    return out


Estimator = Callable[..., TraceEstimate]
T = TypeVar("T")
# Every estimator by name: ``estimator="fd"`` means ``ESTIMATORS["fd"]()``, the class with its defaults.
ESTIMATORS: dict[str, type[TraceEstimator]] = {}


def register_estimator(name: str) -> Callable[[T], T]:
    """Register an estimator under ``name``: a :class:`TraceEstimator` subclass, or a function
    ``fn(module, batch, *, generator=None, **options) -> TraceEstimate``, which gets a class of its own
    whose options are the function's keywords.

    Example:
        >>> @register_estimator("ones_for_doc")
        ... def ones(module, batch, *, generator=None, scale=1.0):
        ...     traces = {t: torch.tensor(scale) for t in module.terms}
        ...     return TraceEstimate(traces, {t: torch.tensor(0.0) for t in traces}, dict.fromkeys(traces, 1), "ones")
        >>> as_estimator("ones_for_doc", scale=2.0)
        as_estimator('ones_for_doc', scale=2.0)
        >>> del ESTIMATORS["ones_for_doc"]
    """

    def decorator(obj: T) -> T:
        cls = obj if isinstance(obj, type) else _estimator_of_function(name, obj)
        cls.name = name
        ESTIMATORS[name] = cls
        return obj

    return decorator


def get_estimator(name: str) -> type[TraceEstimator]:
    """The estimator class registered under ``name``; an unknown name is a ``ValueError`` that lists the known ones."""
    if not isinstance(name, str) or name not in ESTIMATORS:
        raise ValueError(f"Unknown NTK trace estimator {name!r}; choose one of {sorted(ESTIMATORS)}.")
    return ESTIMATORS[name]


class TraceEstimator:
    """A configured estimator of a per-term quantity (``Tr K_ii``, or ``‖∇_θ L_i‖``): its options,
    checked when it is built, and :meth:`estimate`, which does the work.

    The subclasses (:class:`~lightning_ntk.estimators.Exact`, :class:`~lightning_ntk.estimators.Hutchinson`,
    :class:`~lightning_ntk.estimators.FiniteDifference`, …) validate their own options, so a misspelt
    or out-of-range option is an error where the estimator is built, not at the first update. Calling
    the object checks the batch against the module (device, dtype) and computes the estimate:
    ``estimator(module, batch, generator)``.

    Example:
        >>> from lightning_ntk.estimators import Exact
        >>> Exact(chunk_size=64)
        Exact(chunk_size=64, paths=None)
    """

    name: ClassVar[str] = ""
    randomized: ClassVar[bool] = True  # whether averaging estimates over updates reduces the error
    # The function that does the work, ``function(module, batch, generator=..., **options)``.
    function: ClassVar[Estimator]

    def __init__(self, **options: object) -> None:
        if "generator" in options:
            raise ValueError("Pass the generator when calling the estimator, not as an option.")
        self.options = options

    def __call__(self, module: object, batch: object, generator: torch.Generator | None = None) -> TraceEstimate:
        check_batch(module, batch)
        return self.estimate(module, batch, generator)

    def estimate(self, module: object, batch: object, generator: torch.Generator | None) -> TraceEstimate:
        """The estimate for ``module`` on ``batch``: the class's ``function`` with its options."""
        return type(self).function(module, batch, generator=generator, **self.options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable options


def _estimator_of_function(name: str, fn: Estimator) -> type[TraceEstimator]:
    signature = inspect.signature(fn)

    class FunctionEstimator(TraceEstimator):
        __doc__ = fn.__doc__
        function = staticmethod(fn)

        def __init__(self, **options: object) -> None:
            check_option_names(repr(name), options, signature, skip=("module", "batch", "generator"))
            super().__init__(**options)

        def __repr__(self) -> str:
            options = "".join(f", {k}={v!r}" for k, v in self.options.items())
            return f"as_estimator({name!r}{options})"

    FunctionEstimator.__qualname__ = FunctionEstimator.__name__ = f"FunctionEstimator[{name}]"
    return FunctionEstimator


def as_estimator(spec: str | TraceEstimator, **options: object) -> TraceEstimator:
    """``spec`` itself, or the estimator a name stands for, built with ``options`` (its class's
    defaults for the rest).

    Example:
        >>> from lightning_ntk.estimators import as_estimator
        >>> as_estimator("hutchinson", num_probes=4)
        Hutchinson(num_probes=4)
    """
    if isinstance(spec, TraceEstimator):
        if options:
            raise ValueError("Options go to the estimator's constructor, not to as_estimator, for an estimator object.")
        return spec
    cls = get_estimator(spec)
    if not cls.__name__.startswith("FunctionEstimator"):
        check_option_names(f"{spec!r} ({cls.__name__})", options, inspect.signature(cls), skip=())
    return cls(**options)


def check_option_names(shown: str, options: dict[str, object], signature: inspect.Signature, skip: tuple) -> None:
    """Raise a ``ValueError`` naming the estimator and the options it takes if ``options`` has others."""
    takes = [p for p in signature.parameters if p not in skip and p != "self"]
    unknown = [key for key in options if key not in takes]
    if unknown:
        raise ValueError(f"Estimator {shown} does not take option(s) {unknown}; it takes {takes or 'no options'}.")


def check_positive_int(value: object, name: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int{' or None' if allow_none else ''}, got {value!r}.")


def check_positive_number(value: object, name: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number{' or None' if allow_none else ''}, got {value!r}.")

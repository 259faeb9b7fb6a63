"""What every trace estimator returns, and the registry that maps names to estimators."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_ntk import tags
from lightning_ntk.contract import check_batch

__all__ = [
    "ESTIMATORS",
    "ESTIMATOR_CLASSES",
    "TraceEstimate",
    "TraceEstimator",
    "as_estimator",
    "get_estimator",
    "register_estimator",
]


Reduce = Callable[[Tensor, str], Tensor]  # (tensor, "sum" | "mean") -> the same tensor combined over ranks


@dataclass(frozen=True)
class TraceEstimate:
    """Estimates of ``Tr K_ii`` (or, for ``measure="grad_norm"``, of ``‖∇_θ L_i‖``) for every term.

    Attributes:
        traces: term → 0-dim tensor, on the module's device.
        stderr: term → standard error of the estimate (zero for exact estimators, NaN where unknown).
        num_rows: term → ``N_i``, the number of residual entries (rows of ``J_i``); used by
            ``mode="mean_trace"``.
        estimator: Name of the estimator that produced it.
        info: Free-form details (e.g. the Jacobian path each term took).
        measure: What was measured, as logged (:data:`lightning_ntk.tags.TRACE` or
            :data:`~lightning_ntk.tags.GRAD_NORM`).
    """

    traces: dict[str, Tensor]
    stderr: dict[str, Tensor]
    num_rows: dict[str, int]
    estimator: str
    info: dict[str, object] = field(default_factory=dict)
    measure: str = tags.TRACE

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
        traces = torch.stack([self.traces[name].detach() for name in names])
        rows = torch.tensor([float(self.num_rows[name]) for name in names], device=traces.device)
        variances = torch.stack([self.stderr[name].detach() for name in names]).square()
        packed = reduce(torch.cat([traces, rows.to(traces), variances.to(traces)]), "sum")
        return packed.split(len(names))


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


class TraceEstimator:
    """A configured trace estimator: a registered estimator and its options, checked at construction.

    The estimator classes (:class:`~lightning_ntk.estimators.Exact`,
    :class:`~lightning_ntk.estimators.Hutchinson`, :class:`~lightning_ntk.estimators.FiniteDifference`,
    …) fix ``name`` and validate their own options, so a misspelt or out-of-range option is an error
    where the estimator is built, not at the first update. ``TraceEstimator(name, **options)`` wraps an
    estimator registered with :func:`register_estimator` that has no class of its own.

    Calling the object computes the estimate: ``estimator(module, batch, generator)``.

    Example:
        >>> TraceEstimator("exact", chunk_size=64)
        TraceEstimator('exact', chunk_size=64)
    """

    def __init__(self, name: str, **options: object) -> None:
        fn = get_estimator(name)
        if "generator" in options:
            raise ValueError("Pass the generator when calling the estimator, not as an option.")
        check_option_names(repr(name), options, inspect.signature(fn), skip=("module", "batch", "generator"))
        self.name = name
        self.options = options

    def __call__(self, module: object, batch: object, generator: object = None) -> TraceEstimate:
        check_batch(module, batch)
        return get_estimator(self.name)(module, batch, generator=generator, **self.options)

    @property
    def randomized(self) -> bool:
        """Whether the estimate is random (so averaging over updates reduces its error)."""
        return self.name not in ("exact", "grad_norm")

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        if type(self) is TraceEstimator:
            return f"TraceEstimator({self.name!r}{', ' if options else ''}{options})"
        return f"{type(self).__name__}({options})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TraceEstimator) and (self.name, self.options) == (other.name, other.options)

    __hash__ = None  # type: ignore[assignment]  # mutable options


# Estimator classes by name, so that ``estimator="fd"`` means ``FiniteDifference()`` with its defaults.
ESTIMATOR_CLASSES: dict[str, Callable[..., TraceEstimator]] = {}


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
    if isinstance(spec, str) and spec in ESTIMATOR_CLASSES:
        cls = ESTIMATOR_CLASSES[spec]
        check_option_names(f"{spec!r} ({cls.__name__})", options, inspect.signature(cls), skip=())
        return cls(**options)
    return TraceEstimator(spec, **options)


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

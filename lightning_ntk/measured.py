"""What the callback measures through: an estimator applied to the module's NTK view, eagerly
(:class:`MeasuredEstimator`) or replayed from a CUDA graph per batch signature (:class:`CapturedEstimator`).
They wrap estimators; they are not estimators of their own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_ntk.averaging import TraceAverager
from lightning_ntk.capture import CapturedCall, captured_state
from lightning_ntk.estimators.base import TraceEstimate, TraceEstimator
from lightning_ntk.estimators.exact import Exact
from lightning_ntk.estimators.finite_difference import FiniteDifference

__all__ = ["CapturedEstimator", "LastRun", "MeasuredEstimator", "estimator_now", "ntk_view_of"]

# The estimators whose work is a fixed sequence of kernels for a fixed batch signature.
CAPTURABLE = (Exact, FiniteDifference)


@dataclass
class LastRun:
    """The estimate of the last time a captured computation ran in Python (its warm-up or an eager call): the
    row counts, paths and names a replay does not recompute."""

    estimate: TraceEstimate | None = None


class CapturedEstimator(TraceEstimator):
    """``estimator``, replayed from one CUDA graph per module and batch signature.

    The graphs are :class:`~lightning_ntk.capture.CapturedCall` objects.
    The first replay of each graph is checked against an eager call, and a computation that cannot be
    captured runs eagerly with one warning; on a CPU the same buffers are used eagerly. Estimators other
    than ``exact`` and ``fd``, and batches with non-tensor leaves, run eagerly every time.

    Args:
        estimator: The estimator to replay.
        measured: ``measured(module, batch)``: what the estimator measures (the module, or a view of it
            such as :class:`~lightning_ntk.ntk_view.NTKView` frozen on the batch). It runs inside
            the captured computation, so what it derives from the batch is replayed too.
        terms: ``terms(module)``: the term names, in the order of the returned values.

    Example::

        captured = CapturedEstimator(Exact(), measured=lambda module, batch: module, terms=lambda m: m.terms)
        estimate = captured(model, batch, generator)
    """

    def __init__(
        self,
        estimator: TraceEstimator,
        measured: Callable[[nn.Module, Any], nn.Module],
        terms: Callable[[nn.Module], Sequence[str]],
    ) -> None:
        super().__init__()
        self.inner = estimator
        self.measured = measured
        self.terms = terms
        self.randomized = estimator.randomized
        self.name = estimator.name
        # (module, batch structure) → the captured call and the last eager estimate's metadata.
        self.calls: dict[tuple, tuple[CapturedCall, LastRun]] = {}
        # The generator of the current call: a graph made in an earlier fit draws from the new one.
        self._generator: torch.Generator | None = None

    def __call__(self, module: nn.Module, batch: Any, generator: torch.Generator | None = None) -> TraceEstimate:
        leaves, spec = tree_flatten(batch)
        capturable = isinstance(self.inner, CAPTURABLE) and leaves and all(isinstance(t, Tensor) for t in leaves)
        if not capturable:
            return self.inner(self.measured(module, batch), batch, generator)
        self._generator = generator
        call, last = self._call_for(module, spec)
        values, stderr = call(*leaves)
        meta = last.estimate  # what the last Python run of the estimator said besides the numbers
        names = self.terms(module)
        return TraceEstimate(
            dict(zip(names, values.unbind(0), strict=True)),
            dict(zip(names, stderr.unbind(0), strict=True)),
            meta.num_rows,
            meta.estimator,
            meta.info,
            meta.measure,
        )

    def _call_for(self, module: nn.Module, spec: Any) -> tuple:
        key = (id(module), str(spec))
        if key not in self.calls:
            names = self.terms(module)
            last = LastRun()

            def measure(*tensors: Tensor) -> tuple[Tensor, Tensor]:
                inner = tree_unflatten(list(tensors), spec)
                est = last.estimate = self.inner(self.measured(module, inner), inner, self._generator)
                return torch.stack([est.values[n] for n in names]), torch.stack([est.stderr[n] for n in names])

            call = CapturedCall(
                measure,
                state=lambda: captured_state(module),
                generators=(lambda: [self._generator]) if self.inner.randomized else list,
                name=f"{type(self.inner).__name__} traces",
            )
            self.calls[key] = (call, last)
        return self.calls[key]

    def __repr__(self) -> str:
        return f"CapturedEstimator({self.inner!r})"


class MeasuredEstimator(TraceEstimator):
    """``estimator`` applied to ``measured(module, batch)`` instead of the module, eagerly.

    Args:
        estimator: The estimator.
        measured: ``measured(module, batch)``: what the estimator measures.
    """

    def __init__(self, estimator: TraceEstimator, measured: Callable[[nn.Module, Any], nn.Module]) -> None:
        super().__init__()
        self.inner, self.measured = estimator, measured
        self.randomized, self.name = estimator.randomized, estimator.name

    def __call__(self, module: nn.Module, batch: Any, generator: torch.Generator | None = None) -> TraceEstimate:
        return self.inner(self.measured(module, batch), batch, generator)

    def __repr__(self) -> str:
        return f"MeasuredEstimator({self.inner!r})"


def ntk_view_of(module: nn.Module, batch: Any) -> nn.Module:
    """``module.ntk_view(batch)``, looked up on the instance so that a subclass's override is what is measured."""
    return module.ntk_view(batch)


def estimator_now(
    wrapped: dict[str, TraceEstimator], estimator: TraceEstimator, averager: TraceAverager | None, capture: bool
) -> TraceEstimator:
    """The estimator of a weight update, wrapped (once, kept in ``wrapped``) to measure the module's NTK view
    (:meth:`~lightning_ntk.PINNModule.ntk_view`), replayed with ``capture``: an empty average that starts from
    exact traces (``TraceAverager(start="exact")``) gets exact traces for its first update."""
    start = averager is not None and averager.empty and averager.start == "exact" and estimator.randomized
    key = "start" if start else "main"
    if key not in wrapped:
        chosen = Exact() if start else estimator
        if capture:
            wrapped[key] = CapturedEstimator(chosen, measured=ntk_view_of, terms=lambda module: module.terms)
        else:
            wrapped[key] = MeasuredEstimator(chosen, ntk_view_of)
    return wrapped[key]

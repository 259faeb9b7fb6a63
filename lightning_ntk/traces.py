"""The public entry point for NTK block traces: :func:`ntk_traces` and :func:`estimate_ntk_traces`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_ntk.estimators import TraceEstimate, TraceEstimator, as_estimator

__all__ = ["estimate_ntk_traces", "ntk_traces"]


def estimate_ntk_traces(
    module: nn.Module,
    batch: object,
    estimator: str | TraceEstimator = "exact",
    generator: torch.Generator | None = None,
    **options: Any,
) -> TraceEstimate:
    """Estimate ``Tr K_ii`` for every term, with standard errors and row counts.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch) -> Mapping[str, Tensor]`` (e.g. a
            :class:`~lightning_ntk.PINNModule`), on any device.
        batch: The batch ``residuals`` takes, on the module's device.
        estimator: An estimator object (``Hutchinson(num_probes=8)``, …) or the name of one
            (``"exact"``, ``"fd"``, …), built with ``options``.
        generator: Seeds a randomized estimator.
        options: Options of the named estimator (e.g. ``chunk_size``); an option it does not take is
            a ``ValueError`` that lists the ones it does.

    Returns:
        A :class:`~lightning_ntk.estimators.TraceEstimate`. Nothing is written to ``param.grad``,
        the results carry no autograd graph, and the module's train/eval mode is unchanged.
    """
    return as_estimator(estimator, **options)(module, batch, generator)


def ntk_traces(
    module: nn.Module,
    batch: object,
    estimator: str | TraceEstimator = "exact",
    generator: torch.Generator | None = None,
    **options: Any,
) -> dict[str, Tensor]:
    """``Tr K_ii`` for every term over all trainable parameters, as ``{term: 0-dim tensor}``.

    The trace of term ``i`` is ``Σ_n ‖∂r_i(x_n)/∂θ‖²``: frozen parameters are excluded, parameters a
    term does not use contribute zero.

    Example:
        >>> import torch
        >>> class Fit(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(1, 1)
        ...     def residuals(self, x):
        ...         return {"data": self.lin(x)}
        >>> x = torch.tensor([[1.0], [2.0]])
        >>> ntk_traces(Fit(), x)["data"]  # Σ_n (x_n² + 1) = 2 + 5
        tensor(7.)
    """
    return estimate_ntk_traces(module, batch, estimator, generator, **options).traces

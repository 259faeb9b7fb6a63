"""The public entry point for NTK block traces: :func:`ntk_traces` and :func:`estimate_ntk_traces`."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ntk.estimators import TraceEstimate, TraceEstimator, as_estimator
from lightning_ntk.weights import _terms_with_values

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
        the results carry no autograd graph, and the module's train/eval mode is unchanged. A value
        that is NaN or infinite is returned as it is, with a warning that names its term (this reads
        the values on the host; ``NTKWeightingCallback`` checks on the device instead).
    """
    estimate = as_estimator(estimator, **options)(module, batch, generator)
    values = estimate.values
    if values:
        stacked = torch.stack([v.detach().reshape(()) for v in values.values()])
        if not bool(torch.isfinite(stacked).all()):
            read = dict(zip(values, stacked.tolist(), strict=True))
            bad = [name for name, v in read.items() if not math.isfinite(v)]
            terms = _terms_with_values(bad, read)
            warnings.warn(
                f"lightning_ntk: the {estimate.quantity} of {terms} not finite: the residual or its Jacobian holds "
                "NaN/Inf on this batch (lightning_ntk.contract.nonfinite_rows finds the rows).",
                stacklevel=2,
            )
    return estimate


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

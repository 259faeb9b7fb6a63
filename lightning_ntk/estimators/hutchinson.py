"""Hutchinson's estimator on each block: ``Tr K_ii = E_v ‖J_iᵀ v‖²``, ``v`` Rademacher over rows.

Why ``‖J_iᵀ v‖²`` (one VJP per probe and term) rather than ``‖J_i z‖²`` (``z`` over parameters,
one JVP per probe for every term at once): both are Hutchinson's estimator of the same trace, with
variance ``2(‖A‖_F² − Σ_k A_kk²)`` for ``A = K_ii`` or ``A = J_iᵀJ_i``. ``‖K_ii‖_F² = ‖J_iᵀJ_i‖_F²``,
so the VJP form wins by ``2(Σ_n K_nn² − Σ_k (JᵀJ)_kk²)``; PINN blocks have a heavy NTK diagonal
relative to the spread over ``P`` parameters, so it is the lower-variance choice. The VJPs go through
one residual evaluation in plain autograd, so every residual style works, and probes of one term do
not depend on the other terms. The parameter-side direction ``J z`` is what the forward-only ``fd``
estimator uses.

Standard error: sample standard deviation of the ``k`` probe values over ``√k``. Cost: one residual
evaluation plus ``k`` backward passes per term.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_ntk.estimators._sampling import mean_and_stderr, rademacher
from lightning_ntk.estimators.base import TraceEstimate, TraceEstimator, check_positive_int, register_estimator
from lightning_ntk.products import JacobianProducts

__all__ = ["Hutchinson", "hutchinson_traces"]


def hutchinson_traces(
    module: nn.Module, batch: object, *, num_probes: int = 16, generator: torch.Generator | None = None
) -> TraceEstimate:
    """Estimate ``Tr K_ii`` for every term with ``num_probes`` Rademacher probes each.

    Example:
        >>> import torch
        >>> class Fit(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(1, 1)
        ...     def residuals(self, x):
        ...         return {"data": self.lin(x)}
        >>> est = hutchinson_traces(Fit(), torch.ones(1, 1), num_probes=4)
        >>> est.traces["data"]  # one row: ‖Jᵀv‖² = ‖J‖² exactly
        tensor(2.)
    """
    check_positive_int(num_probes, "num_probes")
    products = JacobianProducts(module, batch)

    def term(name: str, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        samples = []
        for _ in range(num_probes):
            v = rademacher((r.numel(),), generator=generator, device=r.device, dtype=r.dtype)
            samples.append(products.squared_norm(products.vjp(name, v)).detach())
        return mean_and_stderr(torch.stack(samples))

    return TraceEstimate(*products.per_term(term), "hutchinson", {"num_probes": num_probes})


@register_estimator("hutchinson")
class Hutchinson(TraceEstimator):
    """Hutchinson's estimator with ``num_probes`` Rademacher probes per term (:func:`hutchinson_traces`).

    Example:
        >>> Hutchinson(num_probes=32)
        Hutchinson(num_probes=32)
    """

    function = staticmethod(hutchinson_traces)

    def __init__(self, num_probes: int = 16) -> None:
        check_positive_int(num_probes, "num_probes")
        super().__init__(num_probes=num_probes)

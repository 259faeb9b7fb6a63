"""The gradient norms ``‖∇_θ L_i‖`` of the loss terms, for gradient-norm weighting (not the NTK).

With the default :class:`~lightning_ntk.WeightRule` the weights are ``λ_i = Σ_j ‖∇_θ L_j‖ / ‖∇_θ L_i‖``,
JAX-PI's default rule (a norm-based form of the learning-rate annealing of Wang, Teng & Perdikaris
2021, whose Algorithm 1 divides the largest entry of ``|∇_θ L_residual|`` by the mean of ``|∇_θ L_i|``),
which several PyTorch libraries call "NTK weighting". It is a per-term measurement like ``Tr K_ii``,
so it is chosen like an estimator (``estimator="grad_norm"``) and logged as ``grad_norm/<term>``; see
:mod:`lightning_ntk.grad_norm` for how it differs from the block traces.

Across DDP ranks the *gradients* are averaged before their norms are taken (the gradient of the
global batch's loss), unlike traces, which add up. Cost: one residual evaluation and one backward
pass per term.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_ntk import tags
from lightning_ntk.estimators.base import Reduce, TraceEstimate, TraceEstimator, register_estimator
from lightning_ntk.grad_norm import loss_gradients_and_rows

__all__ = ["GradNorm", "GradientNorms", "grad_norm_estimate"]


@dataclass(frozen=True)
class GradientNorms(TraceEstimate):
    """Loss-gradient norms per term (in ``traces``), with the gradients themselves for the reduction."""

    gradients: dict[str, Tensor] = field(default_factory=dict)

    def reduce(self, names: Sequence[str], reduce: Reduce) -> tuple[Tensor, Tensor, Tensor]:
        """Norms of the rank-averaged gradients, row counts summed over ranks, no variance (exact)."""
        stacked = torch.stack([self.gradients[name] for name in names])
        rows = torch.tensor([float(self.num_rows[name]) for name in names], device=stacked.device).to(stacked)
        gradients, rows = reduce(stacked, "mean"), reduce(rows, "sum")
        norms = torch.linalg.vector_norm(gradients, dim=1)
        return norms, rows, torch.zeros_like(norms)


def grad_norm_estimate(module: nn.Module, batch: object, *, generator: torch.Generator | None = None) -> GradientNorms:
    """``‖∇_θ L_i‖`` for every term (``generator`` is unused: the measurement is exact).

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.tensor([2.0]))
        ...     def residuals(self, x):
        ...         return {"data": self.w * x}
        >>> grad_norm_estimate(Fit(), torch.tensor([1.0, 3.0])).traces["data"]  # |2 w mean(x²)|
        tensor(20.)
    """
    gradients, rows = loss_gradients_and_rows(module, batch)
    norms = {name: torch.linalg.vector_norm(g) for name, g in gradients.items()}
    return GradientNorms(
        traces=norms,
        stderr={name: torch.zeros_like(v) for name, v in norms.items()},
        num_rows=rows,
        estimator="grad_norm",
        measure=tags.GRAD_NORM,
        gradients=gradients,
    )


@register_estimator("grad_norm")
class GradNorm(TraceEstimator):
    """The loss-gradient norms ``‖∇_θ L_i‖`` (:func:`grad_norm_estimate`): gradient-norm weighting,
    for comparison with the NTK rule.

    Example:
        >>> GradNorm()
        GradNorm()
    """

    function = staticmethod(grad_norm_estimate)
    randomized = False

"""Gradient norms of the loss terms, ``‖∇_θ L_i‖``, for the gradient-norm weighting that is *not* the NTK.

``estimator="grad_norm"`` (:class:`GradNorm`) with the default :class:`~lightning_ntk.weights.WeightRule`
is the default weighting of JAX-PI, ``λ_i = Σ_j ‖∇_θ L_j‖ / ‖∇_θ L_i‖`` with ``L_i`` the term's batch
loss: a norm-based form of the "learning-rate annealing" of Wang, Teng & Perdikaris (2021), whose
Algorithm 1 instead divides the largest entry of ``|∇_θ L_residual|`` by the mean of ``|∇_θ L_i|``. It
balances the size of the terms' *loss gradients*, one number per term from one backward pass each; the
NTK rule balances the block traces ``Tr K_ii = Σ_n ‖∂r_i(x_n)/∂θ‖²``, which depend on the per-point
Jacobians and not on the residual values. The two differ whenever the residuals are not all of one size
(``‖∇L_i‖`` shrinks as term ``i`` is fitted, its NTK trace does not), which is why libraries that call
the gradient-norm rule "NTK weighting" compute something else. It is chosen like an estimator and logged
as ``grad_norm/<term>``, so both can be compared with the same callback and the same logging.

Across DDP ranks the *gradients* are averaged before their norms are taken (the gradient of the
global batch's loss), unlike traces, which add up. Cost: one residual evaluation and one backward
pass per term.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_ntk import tags
from lightning_ntk.contract import check_residuals, declared_terms, trainable_parameters
from lightning_ntk.estimators.base import Reduce, TraceEstimate, TraceEstimator, register_estimator, row_counts

__all__ = ["GradNorm", "GradientNorms", "grad_norm_estimate", "loss_gradients", "loss_gradients_and_rows"]


def _mean_square(name: str, residual: Tensor) -> Tensor:
    return residual.square().mean()


def loss_gradients(module: nn.Module, batch: object) -> dict[str, Tensor]:
    """``∇_θ L_i`` over all trainable parameters, flattened, for every term (no graph kept).

    ``L_i`` is ``module.term_loss(term, r_i)`` when the module defines it (a
    :class:`~lightning_ntk.PINNModule` does), else ``mean(r_i²)``. ``param.grad`` is not touched.

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = nn.Parameter(torch.tensor([2.0]))
        ...     def residuals(self, x):
        ...         return {"data": self.w * x}
        >>> loss_gradients(Fit(), torch.tensor([1.0, 3.0]))["data"]  # d/dw mean((w x)²) = 2 w mean(x²)
        tensor([20.])
    """
    return loss_gradients_and_rows(module, batch)[0]


def loss_gradients_and_rows(module: nn.Module, batch: object) -> tuple[dict[str, Tensor], dict[str, int]]:
    """:func:`loss_gradients`, and the number of residual entries of every term."""
    params = list(trainable_parameters(module).values())
    loss_of: Callable[[str, Tensor], Tensor] = getattr(module, "term_loss", _mean_square)
    with torch.enable_grad():
        residuals: Mapping[str, Tensor] = check_residuals(module.residuals(batch), declared_terms(module))
        names = list(residuals)
        out = {}
        for k, name in enumerate(names):
            grads = torch.autograd.grad(
                loss_of(name, residuals[name]), params, retain_graph=k < len(names) - 1, allow_unused=True
            )
            out[name] = torch.cat(
                [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
            ).detach()
    return out, {name: r.numel() for name, r in residuals.items()}


@dataclass(frozen=True)
class GradientNorms(TraceEstimate):
    """Loss-gradient norms per term (in ``values``), with the gradients themselves for the reduction."""

    gradients: dict[str, Tensor] = field(default_factory=dict)

    def reduce(self, names: Sequence[str], reduce: Reduce) -> tuple[Tensor, Tensor, Tensor]:
        """Norms of the rank-averaged gradients, row counts summed over ranks, no variance (exact)."""
        stacked = torch.stack([self.gradients[name] for name in names])
        rows = row_counts(tuple(self.num_rows[name] for name in names), stacked)
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
        >>> grad_norm_estimate(Fit(), torch.tensor([1.0, 3.0])).values["data"]  # |2 w mean(x²)|
        tensor(20.)
    """
    gradients, rows = loss_gradients_and_rows(module, batch)
    norms = {name: torch.linalg.vector_norm(g) for name, g in gradients.items()}
    return GradientNorms(
        values=norms,
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

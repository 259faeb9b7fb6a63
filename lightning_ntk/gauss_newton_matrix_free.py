"""The Gauss–Newton step without ``J`` or ``K`` in memory: conjugate gradients on ``(K + μI) α = r̃``.

``K v = J (Jᵀ v)`` costs one backward (``Jᵀ v``) and one double backward (``J u``, by differentiating ``Jᵀ w``,
linear in a dummy ``w``, with respect to ``w``) through the graph of one residual evaluation, so memory is that
graph and a few vectors of ``m`` and ``P`` numbers, against ``mP + m²`` for the dense route
(:mod:`lightning_ntk.gauss_newton`). Each iteration costs about three backward passes, and a PINN's damped
kernel needs many (its effective dimension stays high as ``μ`` falls): the route for row counts whose ``K``
does not fit, not a faster one (``benchmarks/gauss_newton_cost.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ntk.contract import declared_terms, evaluate_residuals, trainable_parameters
from lightning_ntk.gauss_newton import GaussNewtonSystem, loss_rows

__all__ = ["MatrixFreeSystem", "conjugate_gradients", "matrix_free_system"]


@dataclass
class MatrixFreeSystem:
    """The same step without ``J`` or ``K`` in memory: ``(K + μI) α = r̃`` by conjugate gradients, ``K v =
    J (Jᵀ v)`` from one backward (``Jᵀ v``) and one double backward (``J u``) through the graph of one
    residual evaluation. Memory is that graph plus a few vectors of ``m`` and ``P``; each CG iteration costs
    about three backward passes.

    Attributes:
        residual: ``r̃`` (no graph), in the solve's dtype.
        params: name → trainable parameter (the module's own names).
        rows: term → its rows of ``r̃``.
        measured, scales: As :class:`GaussNewtonSystem` (for :meth:`loss_now`).
        tolerance: CG stops at ``‖r̃ − (K + μI) α‖ ≤ tolerance · ‖r̃‖``.
        max_iterations: Or after this many iterations.
        iterations: CG iterations of the last :meth:`solve`.
    """

    residual: Tensor
    params: dict[str, Tensor]
    rows: dict[str, slice]
    measured: nn.Module
    scales: dict[str, float]
    scaled: Tensor  # r̃ with its graph, in the model's dtype
    tolerance: float = 1e-10
    max_iterations: int = 1000
    iterations: int = 0
    _dual: tuple[Tensor, list[Tensor]] | None = None
    _remainder: Tensor | None = None

    loss_now = GaussNewtonSystem.loss_now
    loss = GaussNewtonSystem.loss
    unflatten = GaussNewtonSystem.unflatten

    def transpose_product(self, v: Tensor) -> Tensor:
        """``Jᵀ v`` (flat over the parameters), one backward."""
        plist = list(self.params.values())
        grads = torch.autograd.grad(
            self.scaled, plist, grad_outputs=v.to(self.scaled), retain_graph=True, allow_unused=True
        )
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, plist, strict=True)]
        ).to(v)

    def product(self, u: Tensor) -> Tensor:
        """``J u`` (over the rows), by differentiating ``Jᵀ w`` (linear in a dummy ``w``) with respect to ``w``."""
        plist = list(self.params.values())
        if self._dual is None:
            w = torch.zeros_like(self.scaled, requires_grad=True)
            grads = torch.autograd.grad(self.scaled, plist, grad_outputs=w, create_graph=True, allow_unused=True)
            self._dual = (w, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, plist, strict=True)])
        w, grads = self._dual
        pieces = self.unflatten(u.to(self.scaled))
        pairs = [(g, pieces[name]) for g, name in zip(grads, self.params, strict=True) if g.requires_grad]
        (out,) = torch.autograd.grad([g for g, _ in pairs], w, grad_outputs=[x for _, x in pairs], retain_graph=True)
        return out.to(u)

    @torch.enable_grad()  # the double backward builds a graph, also inside an optimizer's no_grad step
    def kernel_product(self, v: Tensor) -> Tensor:
        return self.product(self.transpose_product(v))

    @torch.enable_grad()
    def solve(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(α, Δθ)`` with ``(K + μI) α ≈ r̃`` to :attr:`tolerance` and ``Δθ = −Jᵀ α``."""
        alpha, self._remainder, self.iterations = conjugate_gradients(
            lambda v: self.kernel_product(v) + damping * v, self.residual, self.tolerance, self.max_iterations
        )
        return alpha, -self.transpose_product(alpha)

    def predicted_loss(self, alpha: Tensor, damping: float) -> float:
        """``‖r̃ − Kα‖² = ‖e + μα‖²`` with ``e = r̃ − (K + μI) α`` the solve's remainder (exact for any ``α``)."""
        remainder = (
            self._remainder
            if self._remainder is not None
            else self.residual - self.kernel_product(alpha) - damping * alpha
        )
        return float((remainder + damping * alpha).square().sum())


def conjugate_gradients(matvec, rhs: Tensor, tolerance: float, max_iterations: int) -> tuple[Tensor, Tensor, int]:
    """``x`` with ``A x ≈ b`` for a symmetric positive definite ``A`` given by ``matvec``: ``(x, b − A x, iterations)``,
    stopping at ``‖b − A x‖ ≤ tolerance · ‖b‖``. The remainder is recomputed from ``x`` at the end (one more
    product), so rounding in the recurrence does not hide in it."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = float(r @ r)
    target = tolerance**2 * rr
    k = 0
    while k < max_iterations and rr > target:
        ap = matvec(p)
        step = rr / float(p @ ap)
        x += step * p
        r -= step * ap
        new = float(r @ r)
        p = r + (new / rr) * p
        rr, k = new, k + 1
    return x, rhs - matvec(x), k


def matrix_free_system(
    module: nn.Module,
    batch: object,
    *,
    dtype: torch.dtype = torch.float64,
    tolerance: float = 1e-10,
    max_iterations: int = 1000,
) -> MatrixFreeSystem:
    """:class:`MatrixFreeSystem` of ``module`` on ``batch``: ``r̃`` scaled as in :func:`gauss_newton_system`,
    with its graph, and no Jacobian formed."""
    measured, weights = loss_rows(module, batch)
    residuals = evaluate_residuals(measured, batch, declared_terms(module))
    bad = [t for t, r in residuals.items() if not bool(torch.isfinite(r).all())]
    if bad:
        raise FloatingPointError(
            f"lightning_ntk: the residual of term(s) {bad} holds NaN/Inf on this batch; the Gauss–Newton step was "
            "not taken (lightning_ntk.contract.nonfinite_rows finds the rows)."
        )
    names = {id(p): name for name, p in trainable_parameters(module).items()}
    params = {names[id(p)]: p for p in trainable_parameters(measured).values()}
    pieces, rows, scales, start = [], {}, {}, 0
    for term, r in residuals.items():
        scales[term] = math.sqrt(weights.get(term, 1.0) / r.numel())
        pieces.append(r.reshape(-1) * scales[term])
        rows[term] = slice(start, start + r.numel())
        start += r.numel()
    scaled = torch.cat(pieces)
    return MatrixFreeSystem(
        scaled.detach().to(dtype), params, rows, measured, scales, scaled, tolerance, max_iterations
    )

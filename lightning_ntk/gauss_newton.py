"""The damped Gauss–Newton step in the NTK's residual space (Lightning-free).

A module's loss ``Σ_i λ_i mean(r_i²)`` is ``‖r̃‖²`` with the rows ``r̃_i = √(λ_i / R_i) · r_i`` (``R_i``
entries of term ``i``; a :class:`~lightning_ntk.PINNModule`'s causal and importance scales are already in
its :meth:`~lightning_ntk.PINNModule.ntk_view`). With ``J = ∂r̃/∂θ`` (``m × P``), the damped Gauss–Newton
(Levenberg–Marquardt) step is, by the push-through identity,

    Δθ = −(JᵀJ + μI)⁻¹ Jᵀ r̃ = −Jᵀ α,   (K + μI) α = r̃,   K = J Jᵀ,

an ``m × m`` solve with ``K`` the empirical NTK of every row of the loss, cross-term blocks included.
The rows of ``J`` come from the exact Gram path (:func:`~lightning_ntk.jacobian.full.residual_jacobian`);
``K`` is one matrix product (of the row blocks on and above its diagonal, :func:`symmetric_gram`) and the
solve one Cholesky factorization, both in ``float64`` by default. The model
after the step is predicted to reach ``‖r̃ + JΔθ‖² = ‖r̃ − Kα‖² = μ²‖α‖²``, which is what the gain ratio of
:class:`~lightning_ntk.gauss_newton_optimizer.NTKGaussNewton` compares the actual decrease with.

Cost per step: one residual evaluation and one backward per output component (the rows), ``m²P`` flops
(``K``), ``m³/3`` (Cholesky) and ``mP`` (``Jᵀα``); memory ``mP + m²`` numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ntk.checks import positive_number
from lightning_ntk.contract import declared_terms, evaluate_residuals, trainable_parameters
from lightning_ntk.jacobian.full import residual_jacobian

__all__ = [
    "DEFAULT_MAX_BYTES",
    "GaussNewtonSystem",
    "gauss_newton_direction",
    "gauss_newton_system",
    "loss_rows",
    "symmetric_gram",
]

# J (m × P) and K (m × m) in the solve's dtype: 2 GiB is m ≈ 9k rows of a 20k-parameter network.
DEFAULT_MAX_BYTES = 2 << 30


def loss_rows(module: nn.Module, batch: object) -> tuple[nn.Module, dict[str, float]]:
    """What the loss is a sum of squares of: the module whose residuals to take on ``batch``, and the term
    weights ``λ_i`` (the rows of term ``i`` are then scaled by ``√(λ_i / R_i)``).

    A module with ``ntk_view`` and ``ntk_weights`` (a :class:`~lightning_ntk.PINNModule`) gives its view of
    ``batch`` (causal and importance scales in the rows) and its term weights; any other module with
    ``residuals`` has weight 1 for every term."""
    view = getattr(module, "ntk_view", None)
    if view is None:
        return module, {}
    loss = getattr(type(module), "term_loss", None)
    if loss is not None and loss.__qualname__ != "PINNModule.term_loss":
        raise TypeError(
            f"{type(module).__name__} overrides `term_loss`: the Gauss–Newton step needs each term's loss to be "
            "mean(residual**2) (the loss a sum of squares). Return the residual whose mean square is the loss, "
            "or train this module with a first-order optimizer."
        )
    weights = dict(zip(module.terms, module.ntk_weights.detach().double().tolist(), strict=True))
    return view(batch), weights


@dataclass
class GaussNewtonSystem:
    """``J`` (``m × P``), ``r̃`` (``m``) and ``K = J Jᵀ`` of one batch, in the solve's dtype.

    Attributes:
        jacobian: ``J = ∂r̃/∂θ``, columns over :attr:`params` in their order.
        residual: ``r̃``, so that the loss is ``‖r̃‖²``.
        kernel: ``K = J Jᵀ`` (symmetric).
        params: name → trainable parameter (the module's own names).
        rows: term → its rows of ``r̃``, ``J`` and ``K``.
        paths: term → how its rows were formed (``"gram"``, or ``"rows"``: one backward per row).
    """

    jacobian: Tensor
    residual: Tensor
    kernel: Tensor
    params: dict[str, Tensor]
    rows: dict[str, slice]
    paths: dict[str, str]
    measured: nn.Module
    scales: dict[str, float]

    def loss_now(self, batch: object) -> float:
        """``‖r̃‖²`` at the parameters as they are now, with this system's row scales (causal ones included)."""
        residuals = evaluate_residuals(self.measured, batch, list(self.scales))
        return float(sum(self.scales[t] ** 2 * r.detach().double().square().sum() for t, r in residuals.items()))

    @property
    def loss(self) -> float:
        return float(self.residual.square().sum())

    def solve(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(α, Δθ)`` with ``(K + μI) α = r̃`` and ``Δθ = −Jᵀ α`` (flat, in the solve's dtype)."""
        damped = self.kernel.clone()
        damped.diagonal().add_(damping)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:  # K + μI is positive definite in exact arithmetic; rounding can break that at tiny μ
            alpha = torch.linalg.solve(damped, self.residual)
        else:
            alpha = torch.cholesky_solve(self.residual.unsqueeze(1), factor).squeeze(1)
        return alpha, -(self.jacobian.T @ alpha)

    def predicted_loss(self, alpha: Tensor, damping: float) -> float:
        """``‖r̃ + JΔθ‖² = μ² ‖α‖²``: the loss the linearized model reaches with the step from ``α``."""
        return damping**2 * float(alpha.square().sum())

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat vector over the parameters as tensors shaped (and typed) like them, by name."""
        out, start = {}, 0
        for name, p in self.params.items():
            out[name] = flat[start : start + p.numel()].reshape(p.shape).to(p.dtype)
            start += p.numel()
        return out


def gauss_newton_system(
    module: nn.Module,
    batch: object,
    *,
    dtype: torch.dtype = torch.float64,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> GaussNewtonSystem:
    """``J``, ``r̃`` and ``K`` of ``module`` on ``batch``, scaled so that the loss is ``‖r̃‖²``.

    Raises:
        FloatingPointError: A term's residual or Jacobian is not finite (named); nothing was changed.
        MemoryError: ``J`` and ``K`` would take more than ``max_bytes``.
    """
    measured, weights = loss_rows(module, batch)
    jac = residual_jacobian(measured, batch, declared_terms(module))
    names = {id(p): name for name, p in trainable_parameters(module).items()}
    params = {names[id(p)]: p for p in jac.params.values()}
    bad = [t for t, r in jac.residuals.items() if not bool(torch.isfinite(r).all())]
    bad += [t for t, j in jac.jacobians.items() if t not in bad and not bool(torch.isfinite(j).all())]
    if bad:
        raise FloatingPointError(
            f"lightning_ntk: the residual or its Jacobian of term(s) {bad} holds NaN/Inf on this batch; the "
            "Gauss–Newton step was not taken (lightning_ntk.contract.nonfinite_rows finds the rows)."
        )
    unused = [t for t, j in jac.jacobians.items() if j.numel() and not bool(j.any())]
    if unused:
        raise ValueError(
            f"Term(s) {unused} reach no trainable parameter (their Jacobian is zero): a Gauss–Newton step cannot "
            "move them. Check that the residual is computed from the network's output."
        )
    m = sum(r.numel() for r in jac.residuals.values())
    num_params = sum(p.numel() for p in params.values())
    need = (m * num_params + m * m) * torch.empty((), dtype=dtype).element_size()
    if need > max_bytes:
        raise MemoryError(
            f"A Gauss–Newton step over {m} residual rows and {num_params} parameters needs about {need / 2**20:.0f} "
            f"MiB for J and K, over `max_bytes` = {max_bytes / 2**20:.0f} MiB. Use fewer points per step, or raise "
            "`max_bytes`."
        )
    blocks, rows, scales, start = [], {}, {}, 0
    for term, r in jac.residuals.items():
        scales[term] = math.sqrt(weights.get(term, 1.0) / r.numel())
        blocks.append((jac.jacobians[term].to(dtype) * scales[term], r.to(dtype) * scales[term]))
        rows[term] = slice(start, start + r.numel())
        start += r.numel()
    jacobian = torch.cat([j for j, _ in blocks])
    residual = torch.cat([r for _, r in blocks])
    kernel = symmetric_gram(jacobian)
    return GaussNewtonSystem(jacobian, residual, kernel, params, rows, jac.paths, measured, scales)


def symmetric_gram(jacobian: Tensor, block_rows: int = 256) -> Tensor:
    """``J Jᵀ`` from the products on and above the diagonal only, by blocks of rows (BLAS ``syrk`` is not
    exposed by torch): ``(b + 1) / 2b`` of the GEMM's flops with ``b`` blocks, 1.9× faster than ``J @ J.T``
    at ``m = 1,792``, ``P = 2,307`` on one CPU thread (``benchmarks/gauss_newton_cost.py``). Exactly symmetric."""
    m = jacobian.shape[0]
    blocks = min(8, max(1, m // block_rows))
    edges = [round(i * m / blocks) for i in range(blocks + 1)]
    kernel = jacobian.new_empty(m, m)
    for lo, hi in itertools.pairwise(edges):
        kernel[lo:hi, lo:] = jacobian[lo:hi] @ jacobian[lo:].T
        kernel[hi:, lo:hi] = kernel[lo:hi, hi:].T
    # The diagonal blocks are products of a block with itself: symmetric up to rounding, made exact.
    for lo, hi in itertools.pairwise(edges):
        kernel[lo:hi, lo:hi] = (kernel[lo:hi, lo:hi] + kernel[lo:hi, lo:hi].T) / 2
    return kernel


def gauss_newton_direction(
    module: nn.Module,
    batch: object,
    damping: float,
    *,
    dtype: torch.dtype = torch.float64,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, Tensor]:
    """The damped Gauss–Newton update ``Δθ = −Jᵀ (K + μI)⁻¹ r̃`` of every trainable parameter.

    ``r̃`` is scaled exactly as the module's loss scales each term (term weight, the mean over a term's
    entries, causal and importance scales), so that the loss is ``‖r̃‖²`` and ``θ + Δθ`` minimizes
    ``‖r̃ + JΔθ‖² + μ‖Δθ‖²``. A plain module with ``residuals`` has the loss ``Σ_i mean(r_i²)``.

    Args:
        module: A :class:`~lightning_ntk.PINNModule`, or any ``nn.Module`` with ``residuals(batch)``.
        batch: What ``residuals`` takes.
        damping: ``μ > 0``.
        dtype: Of ``K`` and the solve (``float64`` by default, whatever the model's dtype).
        max_bytes: Refuse (with the size needed) when ``J`` and ``K`` would take more memory.

    Returns:
        ``{name: Δθ}`` for every trainable parameter, keyed and shaped as ``named_parameters()``.

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(1, 1, bias=False)
        ...     def residuals(self, x):
        ...         return {"fit": self.lin(x).squeeze(-1) - 1.0}
        >>> model = Fit()
        >>> with torch.no_grad():
        ...     _ = model.lin.weight.zero_()
        >>> step = gauss_newton_direction(model, torch.tensor([[1.0]]), damping=1e-12)
        >>> round(float(step["lin.weight"]), 6)  # one exact Newton step to w = 1
        1.0
    """
    damping = positive_number("damping", damping)
    system = gauss_newton_system(module, batch, dtype=dtype, max_bytes=max_bytes)
    _, step = system.solve(damping)
    return system.unflatten(step)


def apply_update(params: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> None:
    """``θ ← θ + Δθ`` in place, outside autograd."""
    with torch.no_grad():
        for name, p in params.items():
            p.add_(update[name])

r"""Where to put collocation points, from the residual and the NTK: the pure-torch core of adaptive sampling.

**The per-point NTK diagonal.** For a term with residual ``r_i`` and points ``x_1 … x_N``,

    K_nn = ‖∂r_i(x_n)/∂θ‖²   (summed over the point's rows),   Σ_n K_nn = Tr K_ii,

is how fast gradient descent can move that point's residual: under the gradient flow of ``½‖r‖²`` a point
alone would decay as ``d(r_n²/2)/dt = −K_nn r_n²``. :func:`ntk_diagonal` returns it for every term.

**Densities over a candidate pool.** Adaptive collocation scores a pool of ``P`` uniform candidates and
draws the batch's points from

    p_n ∝ q_n^a / mean_pool(q^a) + c,

after RAD (Wu, Zhu, Tan, Kartha & Lu, CMAME 2023) with ``q_n = |r_n|``; ``c`` keeps a uniform share
``c / (1 + c)`` so no region starves. The NTK-informed score uses ``q_n = |r_n| · √K_nn``, the norm of
the per-point loss gradient ``‖∇_θ r_n²‖ / 2``: the density that minimises the variance of an
importance-weighted gradient estimate (Katharopoulos & Fleuret 2018) and, in NTK terms, the points
whose own loss the next step can lower fastest. Points drawn from ``p`` carry importance weights
``ω_n = 1 / (P p_n)`` (mean 1 under ``p``), which make ``(1/N) Σ ω_n f(x_n)`` an unbiased estimate of the
uniform mean of ``f`` over the pool (:func:`draw`).

Nothing here imports Lightning; :class:`~lightning_ntk.AdaptiveCollocation` is the Lightning layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_ntk.contract import check_residuals, declared_terms
from lightning_ntk.jacobian import per_point_squared_norms
from lightning_ntk.ntk_view import NTKView

__all__ = ["draw", "ntk_diagonal", "point_residual_norms", "scored_density"]


def _measured_view(module: nn.Module, batch: Any) -> nn.Module:
    """The module's own NTK view (a :class:`~lightning_ntk.PINNModule`'s ``ntk_view``: causal scales and the
    importance weights of this batch's points), or for another module with ``causal`` terms an
    :class:`~lightning_ntk.ntk_view.NTKView` of them."""
    own = getattr(module, "ntk_view", None)
    if own is not None:
        return own(batch)
    causal = getattr(module, "causal", None) or {}
    return NTKView(module, causal, module.residual_points).freeze(batch) if causal else module


def ntk_diagonal(
    module: nn.Module,
    batch: Any,
    *,
    num_probes: int | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    r"""The NTK diagonal per point, ``{term: (N_i,)}``: ``K_nn = Σ_{rows of point n} ‖∂r/∂θ‖²``.

    Its sum over a term's points is that term's trace (:func:`~lightning_ntk.ntk_traces`).

    **Causal terms.** For a module with ``causal`` terms (a :class:`~lightning_ntk.PINNModule`), the
    diagonal of such a term is that of its scaled residual ``√s_n r_n`` (:mod:`lightning_ntk.causal`):
    ``s_n K_nn``, with ``s_n = w_k N / (M c_k)`` from this batch's chunk losses. It sums to the causal trace
    the weight rules use; a point in a chunk whose causal weight is still ≈ 0 has a diagonal ≈ 0.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch) -> {term: Tensor}``, on any device.
        batch: What ``residuals`` takes.
        num_probes: ``None``: exact (the per-point norms of the exact trace paths). An int ``k``: the
            unbiased sketch ``K̂_nn = (1/k) Σ_j ‖J_n v_j‖²`` with Gaussian probes ``v_j ~ N(0, I)`` over the
            parameters, one Jacobian–vector product (two backward passes) per probe for the whole
            batch. Its variance is ``2 ‖J_n J_nᵀ‖_F² / k`` (``= 2 K_nn² / k`` for a scalar residual), so
            its relative error is ``√(2/k)`` per point: enough to rank points, not to weight terms.
        generator: Seeds the probes.
        chunk_size: Points per chunk of the exact per-point paths.

    Returns:
        ``{term: Tensor (N_i,)}``, detached. ``param.grad`` and the module's mode are untouched; once warm
        the exact diagonal reads nothing back to the host.

    Example:
        >>> class Fit(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(1, 1)
        ...     def residuals(self, x):
        ...         return {"data": self.lin(x)}
        >>> ntk_diagonal(Fit(), torch.tensor([[1.0], [2.0]]))["data"]  # x_n² + 1
        tensor([2., 5.])
    """
    if num_probes is not None and (isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1):
        raise ValueError(f"`num_probes` must be a positive int or None (exact), got {num_probes!r}.")
    view = _measured_view(module, batch)
    if num_probes is None:
        norms = per_point_squared_norms(view, batch, chunk_size=chunk_size)
        return {name: v.detach() for name, v in norms.norms.items()}
    return _sketched_diagonal(view, batch, num_probes, generator)


def _sketched_diagonal(
    view: nn.Module, batch: Any, num_probes: int, generator: torch.Generator | None
) -> dict[str, Tensor]:
    params = [p for p in view.parameters() if p.requires_grad]
    with torch.enable_grad():
        residuals = dict(check_residuals(view.residuals(batch), declared_terms(view), require_grad=True))
        names = list(residuals)
        # g(w) = Jᵀ w is linear in the dummy cotangent w; differentiating g·v in w gives J v for all points.
        dummies = [torch.zeros_like(r, requires_grad=True) for r in residuals.values()]
        inner = sum((d * r).sum() for d, r in zip(dummies, residuals.values(), strict=True))
        jt_w = torch.autograd.grad(inner, params, create_graph=True, allow_unused=True)
        used = [(g, p) for g, p in zip(jt_w, params, strict=True) if g is not None]
        totals = [r.new_zeros(r.shape[0]) for r in residuals.values()]
        for _ in range(num_probes):
            probes = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for _, p in used]
            dot = sum((g * v).sum() for (g, _), v in zip(used, probes, strict=True))
            jv = torch.autograd.grad(dot, dummies, retain_graph=True, allow_unused=True)
            for k, (j, r) in enumerate(zip(jv, residuals.values(), strict=True)):
                if j is not None:
                    totals[k] = totals[k] + j.detach().reshape(r.shape[0], -1).square().sum(1)
    return {name: t / num_probes for name, t in zip(names, totals, strict=True)}


def point_residual_norms(residual: Tensor) -> Tensor:
    """``|r_n|``: the Euclidean norm of each point's rows, ``(N,)``."""
    return residual.detach().reshape(residual.shape[0], -1).norm(dim=1)


def scored_density(score: Tensor, a: float = 1.0, c: float = 1.0, mean: Tensor | None = None) -> Tensor:
    """``p_n = (q_n^a / m + c) / Σ_j (q_j^a / m + c)`` over a pool, with ``m`` the pool mean of ``q^a``.

    Args:
        score: ``q``, non-negative, ``(P,)``.
        a: Sharpness; 0 is uniform, larger concentrates the points.
        c: Uniform share: ``c / (1 + c)`` of the mass is spread evenly (RAD: ``c = 1``).
        mean: ``m`` if the caller has it (over every rank's pool); default the mean of ``q^a`` here.

    Example:
        >>> scored_density(torch.tensor([0.0, 1.0, 3.0]), a=1.0, c=1.0)  # m = 4/3
        tensor([0.1667, 0.2917, 0.5417])
    """
    powered = score.pow(a)
    m = powered.mean() if mean is None else mean.to(powered)
    unnormalised = powered / m.clamp_min(torch.finfo(powered.dtype).tiny) + c
    return unnormalised / unnormalised.sum()


def draw(density: Tensor, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``n`` pool indices drawn with replacement from ``density`` and their importance weights.

    Returns:
        ``(indices (n,), ω (n,))`` with ``ω = 1 / (P p_index)``: ``E_p[ω f] = mean_pool f``.

    Example:
        >>> idx, omega = draw(torch.tensor([0.5, 0.5]), 4, torch.Generator().manual_seed(0))
        >>> omega
        tensor([1., 1., 1., 1.])
    """
    indices = torch.multinomial(density, n, replacement=True, generator=generator)
    return indices, 1.0 / (density.numel() * density[indices])

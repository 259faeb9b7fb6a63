"""The NTK view of a module: its residual rows scaled as its loss weighs them, in one home.

A causal term's rows are scaled by ``√s_n`` with ``s_n = w_k · ω_n · N / (M · Σ_{j∈k} ω_j)`` (its causal chunk
weights ``w_k`` and the importance weights ``ω`` of its points, :func:`point_scales`), a non-causal term's
importance-weighted rows by ``√ω_n``, so that every estimator, the weight rules and the Gauss–Newton step
see the loss's own rows (:class:`NTKView`; ``PINNModule.ntk_view`` keeps one per module). The causal
schedule itself (chunks, weights, ε) is :mod:`lightning_ntk.causal`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ntk.contract import check_residuals, declared_terms

__all__ = ["NTKView", "chunk_scales", "point_scales", "scale_rows"]


def chunk_scales(chunks: Tensor, weights: Tensor, point_weights: Tensor | None = None) -> Tensor:
    """``w_k · N / (M · Σ_{j∈k} ω_j)`` for every chunk ``k`` (0 for an empty chunk; ``ω ≡ 1`` without
    ``point_weights``, so the sum is the chunk's point count ``c_k``).

    Example:
        >>> chunk_scales(torch.tensor([0, 0, 0, 1]), torch.tensor([1.0, 0.5]))  # N = 4, M = 2, c = (3, 1)
        tensor([0.6667, 1.0000])
    """
    num_chunks = weights.numel()
    chunks = chunks.to(weights.device)
    if point_weights is None:
        mass, floor = torch.bincount(chunks, minlength=num_chunks).to(weights.dtype), 1.0
    else:
        omega = point_weights.to(weights)
        mass, floor = omega.new_zeros(num_chunks).index_add(0, chunks, omega), torch.finfo(omega.dtype).tiny
    return torch.where(mass > 0, weights.detach() * chunks.numel() / (num_chunks * mass.clamp_min(floor)), 0.0)


def point_scales(chunks: Tensor, weights: Tensor, point_weights: Tensor | None = None) -> Tensor:
    """``s_n = w_k · ω_n · N / (M · Σ_{j∈k} ω_j)`` of every point, ``k = k(n)``: :func:`chunk_scales` at the point's
    chunk times its ``ω_n``, so that ``(1/N) Σ_n s_n |r_n|² = (1/M) Σ_k w_k L_k`` with the self-normalised chunk
    losses of :func:`~lightning_ntk.causal.chunk_losses` (``ω ≡ 1`` without ``point_weights``)."""
    per_point = chunk_scales(chunks, weights, point_weights)[chunks.to(weights.device)]
    return per_point if point_weights is None else per_point * point_weights.to(weights)


def scale_rows(residual: Tensor, scales: Tensor) -> Tensor:
    """``√scales_n ·`` every row of point ``n`` of ``residual`` (``(N,)``, ``(N, d)``, …)."""
    factor = scales.to(residual).sqrt()
    return residual * factor.reshape(-1, *([1] * (residual.ndim - 1)))


class NTKView(nn.Module):
    """A module's residuals with its causal terms replaced by ``r̃ = √s · r``, for NTK estimation.

    :meth:`freeze` takes ``s`` from the full batch (its chunk losses at the current parameters, its point
    counts); after that ``s_n`` depends on point ``n``'s time alone, so the view stays pointwise and every
    estimator (the exact Gram path, sketches, ``fd``, subsets of points) and the gradient-norm rule
    measure the causal combination. The callback uses it for a :class:`~lightning_ntk.PINNModule` with
    ``causal`` terms; without Lightning, wrap the model yourself.

    Args:
        module: Has ``residuals(batch)`` (and may have ``terms`` and ``term_loss``).
        causal: ``{term: CausalWeighting}``.
        points: ``points(batch) -> {term: (N, d) points}`` for the causal terms; default
            ``module.residual_points``.

    Example::

        view = NTKView(model, {"pde": CausalWeighting(time_column=1)}, points=lambda b: {"pde": b["pde"]})
        traces = ntk_traces(view.freeze(batch), batch, "exact")
    """

    def __init__(
        self,
        module: nn.Module,
        causal: Mapping[str, Any],
        points: Callable[[Any], Mapping[str, Tensor]] | None = None,
        point_weights: Callable[[], Mapping[str, Tensor]] | None = None,
    ) -> None:
        super().__init__()
        self.inner = module
        self.causal = dict(causal)
        self._points = points if points is not None else getattr(module, "residual_points", None)
        self._point_weights = point_weights if point_weights is not None else dict
        self._scales: dict[str, Tensor] = {}
        self._omega: dict[str, Tensor] = {}

    @property
    def terms(self) -> tuple[str, ...] | None:
        return declared_terms(self.inner)

    def _causal_points(self, batch: Any) -> Mapping[str, Tensor]:
        if not self.causal:
            return {}
        points = self._points(batch)
        missing = [name for name in self.causal if name not in points]
        if missing:
            raise ValueError(f"`residual_points(batch)` must return the points of the causal term(s) {missing}.")
        return points

    def freeze(self, batch: Any) -> NTKView:
        """Fix every causal term's ``w_k N / (M c_k)`` from ``batch``; returns ``self``."""
        with torch.enable_grad():  # residuals in the ordinary style take input derivatives
            residuals = check_residuals(self.inner.residuals(batch), self.terms, require_grad=False)
        points = self._causal_points(batch)
        self._omega = {name: w.detach() for name, w in self._point_weights().items()}
        self._scales = {}
        for name, cw in self.causal.items():
            omega = self._omega.get(name)
            chunks, weights = cw.weights(residuals[name], points[name], omega)
            # Per chunk, so that s_n stays a function of point n (its time and its ω_n).
            self._scales[name] = (
                chunk_scales(chunks, weights) if omega is None else point_scales(chunks, weights, omega)
            )
        return self

    def residuals(self, batch: Any) -> dict[str, Tensor]:
        if set(self._scales) != set(self.causal):
            raise RuntimeError("CausalResiduals.freeze(batch) must run before its residuals are used.")
        out = dict(self.inner.residuals(batch))
        points = self._causal_points(batch)
        for name, cw in self.causal.items():
            if name in self._omega:
                out[name] = scale_rows(out[name], self._rows_of(name, out[name], self._scales[name]))
            else:
                out[name] = scale_rows(out[name], self._scales[name][cw.chunks(points[name]).to(out[name].device)])
        for name, omega in self._omega.items():
            if name not in self.causal:
                out[name] = scale_rows(out[name], self._rows_of(name, out[name], omega))
        return out

    def _rows_of(self, name: str, residual: Tensor, per_point: Tensor) -> Tensor:
        # Importance weights belong to the points of the frozen batch, not to a point's coordinates, so a
        # path that evaluates points one at a time cannot be given them.
        if residual.shape[0] != per_point.shape[0]:
            raise ValueError(
                f"Term {name!r} has importance weights for {per_point.shape[0]} points but its residual has "
                f"{residual.shape[0]} rows here: importance-weighted traces need an estimator that evaluates the "
                "whole batch (exact traces on the Gram path, 'fd', the sketches)."
            )
        return per_point.to(residual.device)

    def term_loss(self, term: str, residual: Tensor) -> Tensor:
        loss = getattr(self.inner, "term_loss", None)
        return residual.square().mean() if loss is None else loss(term, residual)

r"""Causal weighting of a time-dependent residual (Wang, Sankaran & Perdikaris, CMAME 2024), pure torch.

The residual's points are split by their time coordinate into ``M`` chunks of ``[t_min, t_max]``;
chunk ``k`` has the loss ``L_k = mean over its points of |r|²`` and the weight

    w_k = exp(−ε Σ_{j<k} L_j)        (no gradient through w; w_0 = 1),

so a later chunk trains only once the earlier ones fit. The term's loss is ``mean_k(w_k L_k)``. With
NTK weights, JAX-PI averages the residual's NTK diagonal per chunk and multiplies it by ``w_k`` before
the term weights are formed; as a trace (the quantity this package's weight rules take) that is

    Tr_causal = Σ_n w_{k(n)} ‖∂r_n/∂θ‖²,

which is ``Tr K_rr`` when every ``w_k = 1`` and ``N · mean_k(w_k · mean_{n∈k} K_nn)`` (JAX-PI's mean
diagonal times ``N``) when the chunks hold equally many points. ``ε`` may follow a schedule: it moves to
the next value once the smallest weight exceeds ``advance_at`` (every chunk has been fitted).

This module is the core (functions and :class:`CausalWeighting`); wiring it into
:class:`~lightning_ntk.PINNModule` and the callback is not done yet.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["CausalWeighting", "causal_trace", "causal_weights", "chunk_losses", "time_chunks"]


def causal_weights(chunk_losses: Tensor, epsilon: float) -> Tensor:
    """``w_k = exp(−ε Σ_{j<k} L_j)`` for chunk losses ``(M,)``, detached (no gradient flows through w).

    Example:
        >>> causal_weights(torch.tensor([1.0, 2.0, 3.0]), epsilon=1.0)
        tensor([1.0000, 0.3679, 0.0498])
    """
    losses = chunk_losses.detach()
    before = torch.cumsum(losses, 0) - losses  # Σ_{j<k}: the chunk itself is not included
    return torch.exp(-epsilon * before)


def time_chunks(times: Tensor, num_chunks: int, t_min: float, t_max: float) -> Tensor:
    """The chunk (``0 … num_chunks − 1``) of every point from its time; times outside the range go to
    the first or last chunk."""
    scaled = (times.detach().reshape(-1) - t_min) / (t_max - t_min) * num_chunks
    return scaled.floor().long().clamp(0, num_chunks - 1)


def chunk_losses(residual: Tensor, chunks: Tensor, num_chunks: int) -> Tensor:
    """``L_k``: the mean of ``|r_n|²`` (averaged over a point's components) over the points of chunk ``k``;
    0 for a chunk without points. Differentiable in ``residual``."""
    per_point = residual.reshape(residual.shape[0], -1).square().mean(1)
    chunks = chunks.to(per_point.device)
    sums = per_point.new_zeros(num_chunks).index_add(0, chunks, per_point)
    counts = torch.bincount(chunks, minlength=num_chunks).to(per_point.dtype)
    return sums / counts.clamp_min(1)


def causal_trace(point_norms: Tensor, chunks: Tensor, weights: Tensor) -> Tensor:
    """``Σ_n w_{k(n)} ‖∂r_n/∂θ‖²``: the residual's trace with the causal weights of its points' chunks."""
    return (weights.detach().to(point_norms)[chunks.to(point_norms.device)] * point_norms).sum()


class CausalWeighting:
    """Causal weights for one time-dependent term, with an optional schedule for ``ε``.

    Args:
        time_column: Which column of the term's points is time.
        num_chunks: ``M``, the number of time chunks.
        epsilon: ``ε``, or the first value of ``epsilon_schedule``.
        t_range: ``(t_min, t_max)`` of the time domain.
        epsilon_schedule: Increasing values of ``ε`` to move through (the paper: 1e-2 … 1e2); ``None``
            keeps ``epsilon``.
        advance_at: Move to the next ``ε`` once the smallest weight exceeds this (the paper: 0.99).

    Example:
        >>> cw = CausalWeighting(time_column=1, num_chunks=2, epsilon=1.0)
        >>> points = torch.tensor([[0.0, 0.1], [0.0, 0.9]])
        >>> loss = cw.loss(torch.tensor([1.0, 2.0]), points)  # L = [1, 4], w = [1, e⁻¹]
        >>> round(float(loss), 4), cw.last_weights
        (1.2358, tensor([1.0000, 0.3679]))
    """

    def __init__(
        self,
        time_column: int,
        num_chunks: int = 32,
        epsilon: float = 1.0,
        t_range: tuple[float, float] = (0.0, 1.0),
        epsilon_schedule: Sequence[float] | None = None,
        advance_at: float = 0.99,
    ) -> None:
        if isinstance(time_column, bool) or not isinstance(time_column, int) or time_column < 0:
            raise ValueError(f"`time_column` must be a non-negative int, got {time_column!r}.")
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"`num_chunks` must be a positive int, got {num_chunks!r}.")
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or epsilon < 0:
            raise ValueError(f"`epsilon` must be a number >= 0, got {epsilon!r}.")
        if len(t_range) != 2 or not t_range[0] < t_range[1]:
            raise ValueError(f"`t_range` must be (t_min, t_max) with t_min < t_max, got {t_range!r}.")
        schedule = [float(epsilon)] if epsilon_schedule is None else [float(e) for e in epsilon_schedule]
        if not schedule or any(b <= a for a, b in itertools.pairwise(schedule)) or schedule[0] < 0:
            raise ValueError(f"`epsilon_schedule` must be increasing values >= 0, got {epsilon_schedule!r}.")
        if not 0.0 < advance_at < 1.0:
            raise ValueError(f"`advance_at` must be in (0, 1), got {advance_at!r}.")
        self.time_column = time_column
        self.num_chunks = num_chunks
        self.t_range = (float(t_range[0]), float(t_range[1]))
        self.schedule = schedule
        self.advance_at = float(advance_at)
        self.stage = 0
        self.last_weights: Tensor | None = None

    @property
    def epsilon(self) -> float:
        return self.schedule[self.stage]

    def chunks(self, points: Tensor) -> Tensor:
        """The chunk of every point (row) of ``points``."""
        return time_chunks(points[:, self.time_column], self.num_chunks, *self.t_range)

    def loss(self, residual: Tensor, points: Tensor) -> Tensor:
        """``mean_k(w_k L_k)``; the weights (no gradient) are kept in ``last_weights``."""
        losses = chunk_losses(residual, self.chunks(points), self.num_chunks)
        weights = causal_weights(losses, self.epsilon)
        self.last_weights = weights
        return (weights * losses).mean()

    def trace(self, point_norms: Tensor, points: Tensor, residual: Tensor) -> Tensor:
        """:func:`causal_trace` of per-point NTK norms with the weights of ``residual`` on ``points``."""
        chunks = self.chunks(points)
        weights = causal_weights(chunk_losses(residual.detach(), chunks, self.num_chunks), self.epsilon)
        return causal_trace(point_norms, chunks, weights)

    def advance(self) -> bool:
        """Move to the next ``ε`` if every chunk's weight exceeds ``advance_at``; whether it moved."""
        if self.last_weights is None or self.stage + 1 >= len(self.schedule):
            return False
        if bool(self.last_weights.min() > self.advance_at):
            self.stage += 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "schedule": list(self.schedule)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["schedule"]) != self.schedule:
            raise ValueError(f"This state has the ε schedule {state['schedule']}, this object {self.schedule}.")
        self.stage = int(state["stage"])

    def __repr__(self) -> str:
        return (
            f"CausalWeighting(time_column={self.time_column}, num_chunks={self.num_chunks}, "
            f"epsilon_schedule={self.schedule}, t_range={self.t_range}, advance_at={self.advance_at})"
        )

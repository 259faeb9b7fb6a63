r"""Causal weighting of a time-dependent residual (Wang, Sankaran & Perdikaris, CMAME 2024), pure torch.

The residual's ``N`` points are split by their time coordinate into ``M`` chunks of ``[t_min, t_max]``;
chunk ``k`` (``c_k`` points) has the loss ``L_k = mean over its points of |r|²`` and the weight

    w_k = exp(−ε Σ_{j<k} L_j)        (no gradient through w; w_0 = 1),

so a later chunk trains only once the earlier ones fit. The term's loss is ``mean_k(w_k L_k)``, which is
the mean square of the *scaled residual*

    r̃_n = √s_n · r_n,   s_n = w_{k(n)} · N / (M · c_{k(n)})   (s detached),

since ``(1/N) Σ_n s_n |r_n|² = (1/M) Σ_k w_k L_k``. The NTK block of the term is then that of ``r̃``:
``∂r̃_n/∂θ = √s_n ∂r_n/∂θ``, so its trace is

    Tr K̃ = Σ_n s_n ‖∂r_n/∂θ‖² = N · mean_k( w_k · mean_{n∈k} ‖∂r_n/∂θ‖² ),

which is exactly JAX-PI's combination (the residual's NTK diagonal averaged per time chunk, multiplied by
the causal weights, averaged over chunks) times ``N``, the factor that makes it ``Tr K_rr`` when every
``w_k = 1`` and the chunks hold equally many points. Because every estimator and the gradient-norm rule
see the term through ``r̃`` (:class:`~lightning_ntk.ntk_view.NTKView`, also importable as
``CausalResiduals``), they all measure this combination with no code of their own: the exact path, the
sketches, ``fd`` and ``‖∇_θ mean_k(w_k L_k)‖``.

``ε`` may follow a schedule: it moves to the next value once the smallest weight exceeds ``advance_at``
(every chunk has been fitted), as in the paper.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_ntk.contract import check_term_mapping
from lightning_ntk.ntk_view import NTKView, chunk_scales, point_scales, scale_rows

__all__ = [
    "CausalResiduals",
    "CausalState",
    "CausalWeighting",
    "causal_trace",
    "causal_weights",
    "check_causal_terms",
    "chunk_losses",
    "chunk_scales",
    "point_scales",
    "scale_rows",
    "time_chunks",
]


def causal_weights(chunk_losses: Tensor, epsilon: float | Tensor) -> Tensor:
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


def chunk_losses(residual: Tensor, chunks: Tensor, num_chunks: int, point_weights: Tensor | None = None) -> Tensor:
    """``L_k``: the mean of ``|r_n|²`` (averaged over a point's components) over the points of chunk ``k``;
    0 for a chunk without points. Differentiable in ``residual``.

    With ``point_weights`` ``ω_n`` (importance weights of points drawn from a non-uniform density), the
    self-normalised mean ``Σ_{n∈k} ω_n |r_n|² / Σ_{n∈k} ω_n``: the uniform-measure chunk loss again."""
    per_point = residual.reshape(residual.shape[0], -1).square().mean(1)
    chunks = chunks.to(per_point.device)
    if point_weights is not None:
        omega = point_weights.to(per_point)
        sums = per_point.new_zeros(num_chunks).index_add(0, chunks, per_point * omega)
        return sums / per_point.new_zeros(num_chunks).index_add(0, chunks, omega).clamp_min(
            torch.finfo(omega.dtype).tiny
        )
    sums = per_point.new_zeros(num_chunks).index_add(0, chunks, per_point)
    counts = torch.bincount(chunks, minlength=num_chunks).to(per_point.dtype)
    return sums / counts.clamp_min(1)


def causal_trace(point_norms: Tensor, chunks: Tensor, weights: Tensor) -> Tensor:
    """``Σ_n s_n ‖∂r_n/∂θ‖² = N · mean_k(w_k · mean_{n∈k} ‖∂r_n/∂θ‖²)``: the term's trace with its causal
    weights (the module docstring derives it)."""
    chunks = chunks.to(point_norms.device)
    return (chunk_scales(chunks, weights.to(point_norms))[chunks] * point_norms).sum()


@dataclass
class CausalState:
    """Where a :class:`CausalWeighting` is in its ``ε`` schedule: device tensors, moved together.

    Attributes:
        stage: Index of the current ``ε`` (0-dim int64).
        schedule: The ``ε`` values (float64).
        epsilon: ``schedule[stage]`` (0-dim float64), refilled in place when the stage moves: a
            replayed CUDA graph reads it where a Python float would have been frozen into the graph.
    """

    stage: Tensor
    schedule: Tensor
    epsilon: Tensor

    @classmethod
    def at_stage(cls, schedule: Sequence[float], stage: int, device: torch.device | str = "cpu") -> CausalState:
        values = torch.tensor(list(schedule), dtype=torch.float64, device=device)
        return cls(torch.tensor(stage, device=device), values, values[stage].clone())

    def to(self, device: torch.device) -> CausalState:
        return CausalState(self.stage.to(device), self.schedule.to(device), self.epsilon.to(device))

    def set_stage(self, stage: int) -> None:
        self.stage.fill_(stage)
        self.epsilon.copy_(self.schedule[stage])


class CausalWeighting:
    """Causal weights for one time-dependent term, with an optional schedule for ``ε``.

    Give it to :class:`~lightning_ntk.PINNModule` (``causal={"pde": CausalWeighting(...)}``) and the
    term's loss becomes ``mean_k(w_k L_k)`` and its NTK trace the causal one (see the module docstring).

    Args:
        time_column: Which column of the term's points is time.
        num_chunks: ``M``, the number of time chunks (JAX-PI: 32).
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
        self.state = CausalState.at_stage(schedule, 0)
        self.last_weights: Tensor | None = None
        self._range_checked = False

    @property
    def stage(self) -> int:
        """Index of the current ``ε`` in ``schedule`` (read from the state's device)."""
        return int(self.state.stage)

    @stage.setter
    def stage(self, value: int) -> None:
        self.state.set_stage(int(value))

    @property
    def epsilon(self) -> float:
        return self.schedule[self.stage]

    def epsilon_like(self, like: Tensor) -> Tensor:
        """The current ``ε`` as a 0-dim tensor on ``like``'s device and dtype, read from the state in
        place (a replayed CUDA graph sees the stage move)."""
        if self.state.epsilon.device != like.device:
            self.state = self.state.to(like.device)
        return self.state.epsilon.to(like.dtype)

    def chunks(self, points: Tensor) -> Tensor:
        """The chunk of every point (row) of ``points``."""
        if points.ndim != 2 or points.shape[1] <= self.time_column:
            raise ValueError(
                f"Causal weighting reads time from column {self.time_column} of the term's points, but they "
                f"have shape {tuple(points.shape)}; return (N, d) points with d > {self.time_column}."
            )
        times = points[:, self.time_column]
        chunks = time_chunks(times, self.num_chunks, *self.t_range)
        if not self._range_checked:  # once per object: it reads the times on the host
            self._range_checked = True
            self._warn_about_range(times.detach(), chunks)
        return chunks

    def _warn_about_range(self, times: Tensor, chunks: Tensor) -> None:
        """Warn when points fall outside ``t_range`` (they are counted in the end chunks) or when most
        chunks hold no point: both mean ``t_range`` does not describe the data."""
        if times.numel() == 0:
            return
        lo, hi = float(times.min()), float(times.max())
        t0, t1 = self.t_range
        seen = f"the points' times lie in [{lo:.4g}, {hi:.4g}]"
        fix = f"pass CausalWeighting(..., t_range=({min(lo, t0):.4g}, {max(hi, t1):.4g})) or the domain's time interval"
        outside = int(((times < t0) | (times > t1)).sum())
        if outside:
            warnings.warn(
                f"lightning_ntk: causal weighting of time column {self.time_column}: {outside} of "
                f"{times.numel()} points lie outside t_range={self.t_range} ({seen}); they are counted in the "
                f"first or last chunk. If the domain is wider, {fix}.",
                stacklevel=4,
            )
        empty = int((torch.bincount(chunks, minlength=self.num_chunks) == 0).sum())
        # Empty chunks from too few points are noise; empty chunks where the points stop short of
        # the range mean the range is wrong.
        if empty >= max(1, self.num_chunks // 4) and hi - lo < 0.75 * (t1 - t0):
            warnings.warn(
                f"lightning_ntk: causal weighting of time column {self.time_column}: {empty} of "
                f"{self.num_chunks} chunks of t_range={self.t_range} hold no point ({seen}), so the causal "
                f"weights cover only part of the range. If the domain is [{lo:.4g}, {hi:.4g}], pass "
                f"t_range=({lo:.4g}, {hi:.4g}); with few points, use fewer chunks.",
                stacklevel=4,
            )

    def weights(self, residual: Tensor, points: Tensor, point_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(chunk of every point, w)`` for ``residual`` on ``points`` at the current ``ε`` (detached);
        ``point_weights``: importance weights of the points (:func:`chunk_losses`)."""
        if points.shape[0] != residual.shape[0]:
            raise ValueError(
                f"The term's points have {points.shape[0]} rows but its residual {residual.shape[0]}; "
                "row n of both must be point n."
            )
        chunks = self.chunks(points)
        losses = chunk_losses(residual.detach(), chunks, self.num_chunks, point_weights)
        return chunks, causal_weights(losses, self.epsilon_like(losses))

    def apply(self, residual: Tensor, points: Tensor, point_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(√s_n · r_n, w)``: the scaled residual (its mean square is the causal loss; its NTK the causal
        NTK) and the chunk weights; ``point_weights``: importance weights ``ω`` (:func:`point_scales`)."""
        chunks, weights = self.weights(residual, points, point_weights)
        return scale_rows(residual, point_scales(chunks, weights, point_weights)), weights

    def loss(self, residual: Tensor, points: Tensor) -> Tensor:
        """``mean_k(w_k L_k)``; the weights (no gradient) are kept in ``last_weights``."""
        scaled, self.last_weights = self.apply(residual, points)
        return scaled.square().mean()

    def advance_on_device(self, weights: Tensor | None = None) -> None:
        """Keep ``weights`` (this step's chunk weights) as ``last_weights``, then move to the next ``ε`` if every
        chunk's weight exceeds ``advance_at``, decided and done on the state's device with no host read
        (``stage`` and ``epsilon`` read it when asked). Without ``weights``: decide on ``last_weights``."""
        if weights is not None:
            self.last_weights = weights
        weights = self.last_weights
        if weights is None or len(self.schedule) == 1:
            return
        if self.state.stage.device != weights.device:
            self.state = self.state.to(weights.device)
        state = self.state
        moved = (weights.min() > self.advance_at) & (state.stage < len(self.schedule) - 1)
        state.stage.add_(moved.to(state.stage.dtype))
        state.epsilon.copy_(state.schedule.index_select(0, state.stage.view(1)).view(()))

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


# The view, its row scaling and the scales live in lightning_ntk.ntk_view; the old names stay importable here.
CausalResiduals = NTKView


def check_causal_terms(
    causal: Mapping[str, CausalWeighting] | None, terms: Sequence[str]
) -> dict[str, CausalWeighting]:
    """``causal`` as a dict, checked against the declared ``terms``: one :class:`CausalWeighting` of its own per
    declared term."""
    if causal is None:
        return {}
    check_term_mapping(causal, terms, "`causal`", "CausalWeighting")
    for name, cw in causal.items():
        if not isinstance(cw, CausalWeighting):
            raise TypeError(f"`causal[{name!r}]` must be a lightning_ntk.CausalWeighting, got {type(cw).__name__}.")
    if len({id(cw) for cw in causal.values()}) != len(causal):
        raise ValueError("Every causal term needs its own CausalWeighting object (each keeps its own ε stage).")
    return dict(causal)

"""Averaging of noisy trace estimates across updates, before they become weights.

A sketch's single estimate of ``Tr K_ii`` is noisy; the traces themselves drift slowly during
training. :class:`TraceAverager` keeps an exponential moving average of the estimates, so per-step
weights follow ``λ(average)`` rather than ``λ(one estimate)``. Its standard error is that of the
average, ``√(v (1−β)/(1+β))``: for i.i.d. estimates of variance ``σ²`` the average has variance
``σ²(1−β)/(1+β)``, and ``v`` is an exponentially weighted estimate of ``σ²`` from the deviations of
each estimate from the previous average (unbiased for i.i.d. estimates). ``v`` also contains real
drift of the traces, so the error is conservative.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TraceAverager"]


class TraceAverager:
    """Exponential moving average of trace estimates, with the standard error of the average.

    Args:
        beta: Weight of the past in ``[0, 1)``: ``mean ← β·mean + (1−β)·estimate``. About ``1/(1−β)``
            updates are averaged.

    Example:
        >>> avg = TraceAverager(beta=0.5)
        >>> mean, stderr = avg.update(torch.tensor([4.0]))
        >>> mean, stderr = avg.update(torch.tensor([2.0]))
        >>> mean
        tensor([3.])
    """

    def __init__(self, beta: float = 0.99) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be a number in [0, 1), got {beta!r}.")
        self.beta = float(beta)
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    def update(self, traces: Tensor, variances: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Add one estimate (``variances``: its own, used to start the variance); return (mean, stderr)."""
        beta = self.beta
        if self.mean is None or self.var is None:
            self.mean = traces.clone()
            start = torch.zeros_like(traces) if variances is None else torch.nan_to_num(variances.to(traces), nan=0.0)
            self.var = start
        else:
            delta = traces - self.mean
            self.mean = self.mean + (1 - beta) * delta
            # δ = estimate − previous mean has variance σ²(1 + (1−β)/(1+β)) = σ²·2/(1+β) for i.i.d.
            # estimates; the factor (1+β)/2 makes the running variance an unbiased estimate of σ².
            self.var = beta * self.var + (1 - beta) * (1 + beta) / 2 * delta.square()
        return self.mean, (self.var * (1 - beta) / (1 + beta)).sqrt()

    def reset(self) -> None:
        self.mean = None
        self.var = None

    def to(self, device: torch.device | str) -> TraceAverager:
        """Moves the averages (restored on the CPU from a checkpoint) to ``device``."""
        if self.mean is not None and self.var is not None:
            self.mean, self.var = self.mean.to(device), self.var.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        return {"beta": self.beta, "mean": cpu(self.mean), "var": cpu(self.var)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var = state.get("mean"), state.get("var")

    def __repr__(self) -> str:
        return f"TraceAverager(beta={self.beta!r})"

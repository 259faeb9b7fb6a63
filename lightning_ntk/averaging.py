r"""Averaging of noisy trace estimates across updates, before they become weights.

A sketch's single estimate of ``Tr K_ii`` is noisy; the traces themselves drift slowly during
training. :class:`TraceAverager` keeps an exponential moving average of the estimates, so per-step
weights follow ``λ(average)`` rather than ``λ(one estimate)``.

**Standard error of the average.** The first value ``m_0`` has a known variance ``v_0`` (zero when it
is exact, the estimator's own when it reports one) or an unknown one, taken to be ``σ²`` like every
later estimate. After ``k`` more estimates ``e_j`` of variance ``σ²``,
``m_k = β m_{k−1} + (1−β) e_k`` has

    Var(m_k) = a_k + c_k σ²,   a_k = β^{2k} v_0,   c_k = β² c_{k−1} + (1−β)²  (c_0 = 0, or 1 if v_0 is unknown).

``σ²`` is estimated from the deviations ``δ_k = e_k − m_{k−1}``: ``Var(δ_k) = σ² (1 + c_{k−1}) + a_{k−1}``,
so each ``(δ_k² − a_{k−1}) / (1 + c_{k−1})`` is an unbiased estimate of ``σ²``; their exponentially
weighted mean, divided by ``1 − β^k`` (as Adam corrects its moments), is unbiased at every ``k`` for
i.i.d. estimates. It also contains real drift of the traces, so the error is conservative. Before any
deviation is seen the error of an estimate of unknown variance is unknown: NaN, never 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["TraceAverager"]

Start = Literal["exact", "estimate"]


class TraceAverager:
    r"""Exponential moving average of trace estimates, with the standard error of the average.

    Args:
        beta: Weight of the past in ``[0, 1)``: ``mean ← β·mean + (1−β)·estimate``. About ``1/(1−β)``
            updates are averaged.
        start: How :class:`~lightning_ntk.NTKWeightingCallback` starts the average. ``"exact"``
            (default): the first update computes exact traces (about one to two training steps on the
            Gram path, once), so the first weights are exact and the sketch only has to follow the
            drift. ``"estimate"``: the first estimate of the callback's estimator starts it (one
            probe of a sketch can be off by a factor of ten).

    Example:
        >>> avg = TraceAverager(beta=0.5)
        >>> mean, stderr = avg.update(torch.tensor([4.0]), torch.tensor([0.0]))  # an exact start
        >>> mean, stderr = avg.update(torch.tensor([2.0]))
        >>> mean
        tensor([3.])
    """

    def __init__(self, beta: float = 0.99, start: Start = "exact") -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be a number in [0, 1), got {beta!r}.")
        if start not in ("exact", "estimate"):
            raise ValueError(f"`start` must be 'exact' or 'estimate', got {start!r}.")
        self.beta = float(beta)
        self.start = start
        self.reset()

    def reset(self) -> None:
        self.mean: Tensor | None = None
        self._sigma2_sum: Tensor | None = None  # EMA of per-deviation estimates of σ², not yet debiased
        self._known: Tensor | None = None  # a_k: the part of Var(mean) from a start of known variance
        self._coef: Tensor | None = None  # c_k: Var(mean) = a_k + c_k σ²
        self.num_deviations = 0  # k

    @property
    def empty(self) -> bool:
        """Whether no estimate has been added yet."""
        return self.mean is None

    def update(self, traces: Tensor, variances: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Add one estimate and return ``(mean, stderr of the mean)``.

        ``variances`` (the estimate's own, NaN where unknown) is used for the first estimate only;
        later the spread of the estimates is measured.
        """
        beta = self.beta
        if self.mean is None:
            self.mean = traces.clone()
            v0 = torch.full_like(traces, float("nan")) if variances is None else variances.to(traces)
            known = torch.isfinite(v0)
            self._known = torch.where(known, v0, torch.zeros_like(v0))
            self._coef = torch.where(known, torch.zeros_like(v0), torch.ones_like(v0))
            self._sigma2_sum = torch.zeros_like(traces)
        else:
            delta = traces - self.mean
            sigma2 = (delta.square() - self._known) / (1 + self._coef)
            self._sigma2_sum = beta * self._sigma2_sum + (1 - beta) * sigma2
            self.num_deviations += 1
            self.mean = self.mean + (1 - beta) * delta
            self._known = beta**2 * self._known
            self._coef = beta**2 * self._coef + (1 - beta) ** 2
        return self.mean, self.stderr()

    def sigma2(self) -> Tensor:
        """The estimated variance ``σ²`` of one estimate (NaN before the first deviation)."""
        assert self._sigma2_sum is not None, "no estimate added yet"
        if self.num_deviations == 0:
            return torch.full_like(self._sigma2_sum, float("nan"))
        return (self._sigma2_sum / (1 - self.beta**self.num_deviations)).clamp_min(0)

    def stderr(self) -> Tensor:
        """Standard error of the current mean."""
        assert self._coef is not None and self._known is not None, "no estimate added yet"
        random_part = torch.where(self._coef > 0, self._coef * self.sigma2(), torch.zeros_like(self._coef))
        return (self._known + random_part).sqrt()

    def snapshot(self) -> Callable[[], None]:
        """A function that puts the averages back as they are now (the tensors are replaced, never changed in
        place, by :meth:`update`, so keeping references is enough)."""
        kept = (self.mean, self._sigma2_sum, self._known, self._coef, self.num_deviations)

        def restore() -> None:
            self.mean, self._sigma2_sum, self._known, self._coef, self.num_deviations = kept

        return restore

    def to(self, device: torch.device | str) -> TraceAverager:
        """Moves the averages (restored on the CPU from a checkpoint) to ``device``."""
        for attr in ("mean", "_sigma2_sum", "_known", "_coef"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, value.to(device))
        return self

    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        return {
            "beta": self.beta,
            "mean": cpu(self.mean),
            "sigma2_sum": cpu(self._sigma2_sum),
            "known": cpu(self._known),
            "coef": cpu(self._coef),
            "num_deviations": self.num_deviations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.mean = state.get("mean")
        if self.mean is None:
            return
        if "sigma2_sum" not in state:  # written by 0.1.0.dev0 before 2026-11-25: a debiased running σ² "var"
            var = state["var"]
            self._sigma2_sum, self.num_deviations = var, 10**9
            self._known = torch.zeros_like(var)
            self._coef = torch.full_like(var, (1 - self.beta) / (1 + self.beta))
            return
        self._sigma2_sum, self._known, self._coef = state["sigma2_sum"], state["known"], state["coef"]
        self.num_deviations = int(state["num_deviations"])

    def __repr__(self) -> str:
        return f"TraceAverager(beta={self.beta!r}, start={self.start!r})"

"""NTK weight rules as pure functions of the block traces.

``mode="trace"`` (Wang, Yu & Perdikaris 2022, Algorithm 1): ``λ_i = Σ_j Tr K_jj / Tr K_ii``.
A term whose block trace is small trains slowly under gradient flow and gets a large weight; every
``λ_i ≥ 1``.

``mode="mean_trace"`` (the JAX-PI code): ``λ_i = mean_j(Tr K_jj / N_j) / (Tr K_ii / N_i)``, the same
rule on the mean diagonal entry of each block. With equal ``N_i`` it is ``"trace"`` divided by ``T``.

The rules take any positive per-term measurement: given the loss-gradient norms ``‖∇_θ L_i‖`` that
``estimator="grad_norm"`` measures, ``"trace"`` is gradient-norm weighting (not the NTK; see
:mod:`lightning_ntk.estimators.grad_norm`).

Weights are then optionally smoothed, ``w ← ema·w_old + (1 − ema)·λ``, and clamped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "MODES",
    "WeightRule",
    "balancing_weights",
    "check_values",
    "clamp_weights",
    "default_weight_rule",
    "ema_update",
    "raise_for_values",
    "trace_weights",
]

MODES = ("trace", "mean_trace")


def check_mode(mode: str) -> str:
    if mode == "grad_norm":
        raise ValueError(
            "mode='grad_norm' is no longer a weight rule: gradient norms are measured like traces. Use "
            "NTKWeightingCallback(estimator='grad_norm', weight_rule=WeightRule()) for the same weights."
        )
    if mode not in MODES:
        raise ValueError(f"Unknown weighting mode {mode!r}; choose one of {list(MODES)}.")
    return mode


def check_values(values: Tensor, names: Sequence[str], quantity: str = "NTK trace") -> None:
    """Raise if a per-term measurement (a trace, or the ``quantity`` named) is non-finite or not
    positive, naming every such term and only those (one host sync).

    Raises:
        FloatingPointError: Some values are NaN or infinite (checked first).
        ValueError: Some values are zero or negative.
    """
    finite = torch.isfinite(values)
    positive = values > 0
    if bool((finite & positive).all()):
        return
    raise_for_values(values, names, quantity)


def raise_for_values(values: Tensor, names: Sequence[str], quantity: str = "NTK trace") -> None:
    """The error :func:`check_values` raises, for values known to be bad (one read of them)."""
    read = dict(zip(names, values.tolist(), strict=True))
    bad = [name for name in names if not math.isfinite(read[name])]
    if bad:
        raise FloatingPointError(
            f"{quantity} of {_terms_with_values(bad, read)} not finite: the residual or its Jacobian is not. "
            "Check the residual for NaN/Inf (division by zero, log of a negative, an exploding network)."
        )
    zero = [name for name in names if not read[name] > 0]
    raise ValueError(
        f"{quantity} of {_terms_with_values(zero, read)} not positive: the residual does not depend on the "
        "trainable parameters at these points (or, for a gradient norm, is already zero), so it has no weight. "
        "Check the residual."
    )


def _terms_with_values(names: Sequence[str], values: Mapping[str, float]) -> str:
    listed = ", ".join(f"{name!r} ({values[name]})" for name in names)
    return f"term {listed} is" if len(names) == 1 else f"terms {listed} are"


def balancing_weights(traces: Tensor, mode: str = "trace", num_rows: Tensor | None = None) -> Tensor:
    """Weights that balance a vector of traces ``(T,)``, in the same order: ``λ_i = Σ_j T_j / T_i``
    (``"trace"``), or the same of the per-row means ``T_i / N_i`` (``"mean_trace"``).

    Args:
        traces: Positive block traces ``Tr K_ii`` (or another per-term measurement, e.g. ``‖∇_θ L_i‖``).
        mode: ``"trace"`` or ``"mean_trace"``.
        num_rows: Rows of each term's Jacobian ``J_i`` (its residual entries: points × values per point), for
            ``"mean_trace"``.

    Example:
        >>> balancing_weights(torch.tensor([1.0, 99.0]))
        tensor([100.0000,   1.0101])
    """
    check_mode(mode)
    if traces.ndim != 1 or traces.numel() == 0:
        raise ValueError(f"`traces` must be a non-empty vector, got shape {tuple(traces.shape)}.")
    if mode == "trace":
        return traces.sum() / traces
    if num_rows is None:
        raise ValueError('mode="mean_trace" needs `num_rows` (the rows of J_i, residual entries, for every term).')
    mean_diag = traces / num_rows.to(traces)
    return mean_diag.mean() / mean_diag


def ema_update(old: Tensor, new: Tensor, ema: float) -> Tensor:
    """``ema·old + (1 − ema)·new``; ``ema = 0`` returns ``new``."""
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"`ema` must be in [0, 1), got {ema}.")
    return torch.lerp(new, old.to(new), ema)


def clamp_weights(weights: Tensor, min_weight: float | None = None, max_weight: float | None = None) -> Tensor:
    """Clamp weights into ``[min_weight, max_weight]`` (either bound optional)."""
    if min_weight is not None and max_weight is not None and min_weight > max_weight:
        raise ValueError(f"`min_weight` ({min_weight}) is larger than `max_weight` ({max_weight}).")
    if min_weight is None and max_weight is None:
        return weights
    return weights.clamp(min=min_weight, max=max_weight)


def trace_weights(
    traces: Mapping[str, Tensor | float],
    mode: str = "trace",
    num_rows: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Weights for named traces: ``{term: λ_i}``.

    Example:
        >>> w = trace_weights({"bc": 1.0, "pde": 99.0})
        >>> {k: round(float(v), 4) for k, v in w.items()}
        {'bc': 100.0, 'pde': 1.0101}
    """
    names = list(traces)
    vec = torch.stack([torch.as_tensor(traces[n]) for n in names])
    if not vec.is_floating_point():
        vec = vec.to(torch.get_default_dtype())
    check_values(vec, names)
    rows = None
    if num_rows is not None:
        rows = torch.tensor([float(num_rows[n]) for n in names], dtype=vec.dtype, device=vec.device)
    return dict(zip(names, balancing_weights(vec, mode, rows), strict=True))


def _check_fraction(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1) (0 = no smoothing), got {value!r}.")
    return float(value)


def _check_bound(value: object, name: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
        raise ValueError(f"`{name}` must be a positive number or None, got {value!r}.")


class WeightRule:
    """Turns block traces into loss weights: the rule (``mode``), smoothing across updates, clamps.

    ``rule(traces, num_rows, previous)`` returns ``clamp(ema·previous + (1 − ema)·λ(traces))``, with
    ``λ`` from :func:`balancing_weights` and ``previous`` the weights in use (``None`` before the first
    update: no smoothing then).

    Args:
        mode: ``"trace"`` (Wang, Yu & Perdikaris 2022) or ``"mean_trace"`` (the JAX-PI rule on mean
            diagonals); see :func:`balancing_weights`. For gradient-norm weighting choose
            ``estimator="grad_norm"`` in the callback and keep ``"trace"`` here.
        ema: Smoothing of the weights across updates in ``[0, 1)``; ``0`` overwrites.
        min_weight: Lower clamp, or ``None``.
        max_weight: Upper clamp, or ``None``.

    Example:
        >>> rule = WeightRule(ema=0.5, max_weight=50.0)
        >>> rule(torch.tensor([1.0, 99.0]), previous=torch.tensor([1.0, 1.0]))
        tensor([50.0000,  1.0051])
    """

    def __init__(
        self,
        mode: str = "trace",
        ema: float = 0.0,
        min_weight: float | None = None,
        max_weight: float | None = None,
    ) -> None:
        self.mode = check_mode(mode)
        self.ema = _check_fraction(ema, "ema")
        _check_bound(min_weight, "min_weight")
        _check_bound(max_weight, "max_weight")
        if min_weight is not None and max_weight is not None and min_weight > max_weight:
            raise ValueError(f"`min_weight` ({min_weight}) is larger than `max_weight` ({max_weight}).")
        self.min_weight = min_weight
        self.max_weight = max_weight

    def __call__(self, traces: Tensor, num_rows: Tensor | None = None, previous: Tensor | None = None) -> Tensor:
        weights = balancing_weights(traces, self.mode, num_rows)
        if self.ema > 0.0 and previous is not None:
            weights = ema_update(previous, weights, self.ema)
        return clamp_weights(weights, self.min_weight, self.max_weight)

    def __repr__(self) -> str:
        return (
            f"WeightRule(mode={self.mode!r}, ema={self.ema!r}, min_weight={self.min_weight!r}, "
            f"max_weight={self.max_weight!r})"
        )


def default_weight_rule(grad_norms: bool = False, causal: bool = False) -> WeightRule:
    """The rule :class:`~lightning_ntk.NTKWeightingCallback` uses when it is given none.

    ``mode="trace"`` (Wang, Yu & Perdikaris 2022), except for NTK traces of a module with causal terms:
    there ``mode="mean_trace"`` (JAX-PI's per-point rule). Measured over the examples
    (``docs/results.md``, "Which weight rule"): with causal training ``"trace"`` gives the few initial
    points a weight in the thousands and the causal front reaches the end late, and ``"mean_trace"``
    halved the error of Allen–Cahn and Burgers at every budget tried; without causal terms neither rule
    won across problems (each was better on some), and with equal point counts the two agree up to one
    common factor. For loss-gradient norms (``estimator="grad_norm"``) always ``"trace"``:
    gradient-norm weighting.

    Example:
        >>> default_weight_rule().mode, default_weight_rule(causal=True).mode
        ('trace', 'mean_trace')
        >>> default_weight_rule(grad_norms=True, causal=True).mode
        'trace'
    """
    return WeightRule("mean_trace" if causal and not grad_norms else "trace")

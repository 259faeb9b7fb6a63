"""lightning_ntk: neural tangent kernel (NTK) loss weighting for PyTorch Lightning.

The pure-torch core (:mod:`~lightning_ntk.traces`, :mod:`~lightning_ntk.estimators`,
:mod:`~lightning_ntk.weights`, :mod:`~lightning_ntk.spectrum`, :mod:`~lightning_ntk.derivatives`,
:mod:`~lightning_ntk.jacobian`, :mod:`~lightning_ntk.causal`) does not import Lightning, and neither
does ``import lightning_ntk``:
:class:`PINNModule`, :class:`NTKWeightingCallback` and :class:`NTKSpectrumMonitor` (the thin Lightning layer) and
:class:`RelativeL2Error` (torchmetrics) are imported when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_ntk import derivatives
from lightning_ntk.averaging import TraceAverager
from lightning_ntk.causal import CausalResiduals, CausalWeighting
from lightning_ntk.collocation import ntk_diagonal
from lightning_ntk.estimators import (
    Auto,
    Exact,
    FiniteDifference,
    GradNorm,
    Hutchinson,
    HutchPlusPlus,
    Subsample,
    TraceEstimate,
    TraceEstimator,
    register_estimator,
)
from lightning_ntk.gauss_newton import gauss_newton_direction, gauss_newton_system
from lightning_ntk.gauss_newton_optimizer import GaussNewtonRecord, GaussNewtonWarning, NTKGaussNewton
from lightning_ntk.spectrum import Spectrum, block_spectra, ntk_eigenvalues, ntk_matrix
from lightning_ntk.taylor import TaylorMLP
from lightning_ntk.traces import estimate_ntk_traces, ntk_traces
from lightning_ntk.weights import (
    WeightRule,
    balancing_weights,
    clamp_weights,
    default_weight_rule,
    ema_update,
    trace_weights,
)

if TYPE_CHECKING:
    from lightning_ntk.adaptive_collocation import AdaptiveCollocation
    from lightning_ntk.callback import NTKWeightingCallback
    from lightning_ntk.loss_average import LossTimeAverage
    from lightning_ntk.metrics import RelativeL2Error
    from lightning_ntk.module import PINNModule
    from lightning_ntk.spectrum_monitor import NTKSpectrumMonitor

__version__ = "0.1.0.dev0"

_LAZY = {
    "AdaptiveCollocation": "lightning_ntk.adaptive_collocation",
    "NTKSpectrumMonitor": "lightning_ntk.spectrum_monitor",
    "NTKWeightingCallback": "lightning_ntk.callback",
    "LossTimeAverage": "lightning_ntk.loss_average",
    "PINNModule": "lightning_ntk.module",
    "RelativeL2Error": "lightning_ntk.metrics",
}


def __getattr__(name: str) -> Any:
    # Lightning takes seconds to import; a plain PyTorch user of the core should not pay for it.
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_ntk' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# Lightning layer: NTKWeightingCallback, NTKSpectrumMonitor, LossTimeAverage, PINNModule, AdaptiveCollocation (points
# drawn from residual or NTK scores; its core: ntk_diagonal and lightning_ntk.collocation). Callback parts: the trace
# estimators (Exact, FiniteDifference, Hutchinson, HutchPlusPlus, Subsample, Auto, GradNorm,
# TraceEstimator), WeightRule, TraceAverager; causal weighting: CausalWeighting, CausalResiduals.
# Training with the whole NTK: NTKGaussNewton (an optimizer), gauss_newton_direction, gauss_newton_system,
# GaussNewtonRecord, GaussNewtonWarning.
# Traces: ntk_traces, estimate_ntk_traces, TraceEstimate, register_estimator. Spectra: ntk_matrix,
# ntk_eigenvalues, block_spectra, Spectrum. Weight rules as functions: balancing_weights, trace_weights,
# ema_update, clamp_weights. Networks and metrics: TaylorMLP, RelativeL2Error. Input derivatives:
# the `derivatives` module.
__all__ = [
    "AdaptiveCollocation",
    "Auto",
    "CausalResiduals",
    "CausalWeighting",
    "Exact",
    "FiniteDifference",
    "GaussNewtonRecord",
    "GaussNewtonWarning",
    "GradNorm",
    "HutchPlusPlus",
    "Hutchinson",
    "LossTimeAverage",
    "NTKGaussNewton",
    "NTKSpectrumMonitor",
    "NTKWeightingCallback",
    "PINNModule",
    "RelativeL2Error",
    "Spectrum",
    "Subsample",
    "TaylorMLP",
    "TraceAverager",
    "TraceEstimate",
    "TraceEstimator",
    "WeightRule",
    "balancing_weights",
    "block_spectra",
    "clamp_weights",
    "default_weight_rule",
    "derivatives",
    "ema_update",
    "estimate_ntk_traces",
    "gauss_newton_direction",
    "gauss_newton_system",
    "ntk_diagonal",
    "ntk_eigenvalues",
    "ntk_matrix",
    "ntk_traces",
    "register_estimator",
    "trace_weights",
]

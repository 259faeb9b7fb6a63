"""lightning_ntk: neural tangent kernel (NTK) loss weighting for PyTorch Lightning.

The pure-torch core (:mod:`~lightning_ntk.traces`, :mod:`~lightning_ntk.estimators`,
:mod:`~lightning_ntk.weights`, :mod:`~lightning_ntk.spectrum`, :mod:`~lightning_ntk.derivatives`,
:mod:`~lightning_ntk.jacobian`) does not import Lightning, and neither does ``import lightning_ntk``:
:class:`PINNModule` and :class:`NTKWeightingCallback` (the thin Lightning layer) and
:class:`RelativeL2Error` (torchmetrics) are imported when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_ntk import derivatives
from lightning_ntk.estimators import TraceEstimate, register_estimator
from lightning_ntk.spectrum import Spectrum, ntk_eigenvalues, ntk_matrix
from lightning_ntk.taylor import TaylorMLP
from lightning_ntk.traces import estimate_ntk_traces, ntk_traces
from lightning_ntk.weights import clamp_weights, ema_update, ntk_weights, trace_weights

if TYPE_CHECKING:
    from lightning_ntk.callback import NTKWeightingCallback
    from lightning_ntk.metrics import RelativeL2Error
    from lightning_ntk.module import PINNModule

__version__ = "0.1.0.dev0"

_LAZY = {
    "NTKWeightingCallback": "lightning_ntk.callback",
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


# Lightning layer: NTKWeightingCallback, PINNModule. Traces: ntk_traces, estimate_ntk_traces,
# TraceEstimate, register_estimator. Spectra: ntk_matrix, ntk_eigenvalues, Spectrum. Weight rules:
# ntk_weights, trace_weights, ema_update, clamp_weights. Networks and metrics: TaylorMLP,
# RelativeL2Error. Input derivatives: the `derivatives` module.
__all__ = [
    "NTKWeightingCallback",
    "PINNModule",
    "RelativeL2Error",
    "Spectrum",
    "TaylorMLP",
    "TraceEstimate",
    "clamp_weights",
    "derivatives",
    "ema_update",
    "estimate_ntk_traces",
    "ntk_eigenvalues",
    "ntk_matrix",
    "ntk_traces",
    "ntk_weights",
    "register_estimator",
    "trace_weights",
]

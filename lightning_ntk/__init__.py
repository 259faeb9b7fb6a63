"""lightning_ntk: neural tangent kernel (NTK) loss weighting for PyTorch Lightning.

The pure-torch core (:mod:`~lightning_ntk.traces`, :mod:`~lightning_ntk.estimators`,
:mod:`~lightning_ntk.weights`, :mod:`~lightning_ntk.derivatives`, :mod:`~lightning_ntk.jacobian`)
does not import Lightning; :class:`PINNModule` and :class:`NTKWeightingCallback` are the thin
Lightning layer on top.
"""

from lightning_ntk import derivatives
from lightning_ntk.callback import NTKWeightingCallback
from lightning_ntk.estimators import TraceEstimate
from lightning_ntk.module import PINNModule
from lightning_ntk.spectrum import Spectrum, ntk_eigenvalues, ntk_matrix
from lightning_ntk.traces import estimate_ntk_traces, ntk_traces
from lightning_ntk.weights import clamp_weights, ema_update, ntk_weights, trace_weights

__version__ = "0.1.0.dev0"

# Lightning layer: NTKWeightingCallback, PINNModule. Traces: ntk_traces, estimate_ntk_traces,
# TraceEstimate. Spectra: ntk_matrix, ntk_eigenvalues, Spectrum. Weight rules: ntk_weights,
# trace_weights, ema_update, clamp_weights. Input derivatives: the `derivatives` module.
__all__ = [
    "NTKWeightingCallback",
    "PINNModule",
    "Spectrum",
    "TraceEstimate",
    "clamp_weights",
    "derivatives",
    "ema_update",
    "estimate_ntk_traces",
    "ntk_eigenvalues",
    "ntk_matrix",
    "ntk_traces",
    "ntk_weights",
    "trace_weights",
]

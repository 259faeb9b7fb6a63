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
from lightning_ntk.traces import estimate_ntk_traces, ntk_traces
from lightning_ntk.weights import clamp_weights, ema_update, ntk_weights, trace_weights

__version__ = "0.1.0.dev0"

__all__ = [
    # Lightning layer
    "NTKWeightingCallback",
    "PINNModule",
    # traces
    "TraceEstimate",
    # weight rules
    "clamp_weights",
    # input derivatives
    "derivatives",
    "ema_update",
    "estimate_ntk_traces",
    "ntk_traces",
    "ntk_weights",
    "trace_weights",
]

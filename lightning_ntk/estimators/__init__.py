"""NTK block-trace estimators, one per module, registered by name for :func:`lightning_ntk.ntk_traces`."""

from lightning_ntk.estimators.base import ESTIMATORS, TraceEstimate, get_estimator, register_estimator
from lightning_ntk.estimators.exact import exact_traces

__all__ = ["ESTIMATORS", "TraceEstimate", "exact_traces", "get_estimator", "register_estimator"]

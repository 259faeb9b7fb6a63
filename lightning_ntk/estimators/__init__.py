"""NTK block-trace estimators, one per module, registered by name for :func:`lightning_ntk.ntk_traces`.

| name | estimate of ``Tr K_ii`` | cost |
| --- | --- | --- |
| ``exact`` | ``Σ_n ‖∂r_i(x_n)/∂θ‖²`` | one per-point Jacobian per point |
| ``subsample`` | exact norms on ``m`` random points × ``N_i/m`` | ``m/N_i`` of exact |
| ``hutchinson`` | ``mean ‖J_iᵀ v‖²``, ``v`` Rademacher | one backward per probe and term |
| ``hutchpp`` | Hutch++ on ``K_ii`` | ``k`` NTK products + ``2k`` backward per term |
| ``fd`` | ``mean ‖(r(θ+hz) − r(θ−hz))/2h‖²`` | two residual evaluations per probe, all terms |
| ``auto`` | ``exact`` or ``hutchpp`` by ``Σ N_i · P`` | |
"""

from lightning_ntk.estimators.base import ESTIMATORS, TraceEstimate, get_estimator, register_estimator
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.estimators.finite_difference import fd_step_size, finite_difference_traces
from lightning_ntk.estimators.hutchinson import hutchinson_traces
from lightning_ntk.estimators.hutchpp import hutchpp_traces
from lightning_ntk.estimators.subsample import subsample_traces

from lightning_ntk.estimators.auto import auto_traces  # isort: skip  (uses exact and hutchpp)

__all__ = [
    "ESTIMATORS",
    "TraceEstimate",
    "auto_traces",
    "exact_traces",
    "fd_step_size",
    "finite_difference_traces",
    "get_estimator",
    "hutchinson_traces",
    "hutchpp_traces",
    "register_estimator",
    "subsample_traces",
]

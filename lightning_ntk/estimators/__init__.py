"""NTK block-trace estimators, one per module, registered by name for :func:`lightning_ntk.ntk_traces`.

| name | class | estimate of ``Tr K_ii`` | cost |
| --- | --- | --- | --- |
| ``exact`` | :class:`Exact` | ``Σ_n ‖∂r_i(x_n)/∂θ‖²`` | 1–2 training steps (Gram path), else one Jacobian per point |
| ``subsample`` | :class:`Subsample` | exact norms on ``m`` random points × ``N_i/m`` | ``m/N_i`` of exact |
| ``hutchinson`` | :class:`Hutchinson` | ``mean ‖J_iᵀ v‖²``, ``v`` Rademacher | one backward per probe and term |
| ``hutchpp`` | :class:`HutchPlusPlus` | Hutch++ on ``K_ii`` | ``k`` NTK products + ``2k`` backward per term |
| ``fd`` | :class:`FiniteDifference` | ``mean ‖(r(θ+hz) − r(θ−hz))/2h‖²`` | 2 residual evaluations per probe |
| ``auto`` | :class:`Auto` | ``exact`` or ``hutchpp`` by ``Σ N_i · P`` | |
| ``grad_norm`` | :class:`GradNorm` | not a trace: ``‖∇_θ L_i‖``, for gradient-norm weighting | one backward per term |

One class per estimator, registered by name in :data:`ESTIMATORS` (the one registry): it validates
its options when it is built and calls its module's function to do the work. Its name alone
(``estimator="fd"``) stands for the class with its defaults (:func:`as_estimator`).
"""

from lightning_ntk.estimators.base import (
    ESTIMATORS,
    TraceEstimate,
    TraceEstimator,
    as_estimator,
    get_estimator,
    register_estimator,
)
from lightning_ntk.estimators.exact import Exact, exact_traces
from lightning_ntk.estimators.finite_difference import (
    FiniteDifference,
    auto_points_per_probe,
    fd_step_size,
    finite_difference_traces,
)
from lightning_ntk.estimators.grad_norm import (
    GradientNorms,
    GradNorm,
    grad_norm_estimate,
    loss_gradients,
    loss_gradients_and_rows,
)
from lightning_ntk.estimators.hutchinson import Hutchinson, hutchinson_traces
from lightning_ntk.estimators.hutchpp import HutchPlusPlus, hutchpp_traces
from lightning_ntk.estimators.subsample import Subsample, subsample_traces

from lightning_ntk.estimators.auto import Auto, auto_traces, exact_work  # isort: skip  (uses exact and hutchpp)


__all__ = [
    "ESTIMATORS",
    "Auto",
    "Exact",
    "FiniteDifference",
    "GradNorm",
    "GradientNorms",
    "HutchPlusPlus",
    "Hutchinson",
    "Subsample",
    "TraceEstimate",
    "TraceEstimator",
    "as_estimator",
    "auto_points_per_probe",
    "auto_traces",
    "exact_traces",
    "exact_work",
    "fd_step_size",
    "finite_difference_traces",
    "get_estimator",
    "grad_norm_estimate",
    "hutchinson_traces",
    "hutchpp_traces",
    "loss_gradients",
    "loss_gradients_and_rows",
    "register_estimator",
    "subsample_traces",
]

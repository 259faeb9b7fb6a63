"""The names under which the package logs, in one place: the callback, the spectrum monitor and the
TensorBoard layout all build their tags here.

Example:
    >>> scalar(TRACE, "pde"), stderr(GRAD_NORM, "bc"), scalar(WEIGHT, "bc")
    ('ntk/trace/pde', 'grad_norm_stderr/bc', 'ntk/weight/bc')
"""

from __future__ import annotations

__all__ = [
    "CAUSAL_EPSILON",
    "CAUSAL_MIN_WEIGHT",
    "CAUSAL_WEIGHTS",
    "COLLOCATION_DENSITY",
    "COLLOCATION_EFFECTIVE_SHARE",
    "COLLOCATION_SCORE_PEAK",
    "CONDITION",
    "EFFECTIVE_RANK",
    "EIGENVALUE",
    "EIGENVALUE_HISTOGRAM",
    "GN_CG_ITERATIONS",
    "GN_CONDITION",
    "GN_DAMPING",
    "GN_GAIN_RATIO",
    "GN_LOSS_AFTER",
    "GN_LOSS_BEFORE",
    "GN_RETRIES",
    "GN_STEP_NORM",
    "GRAD_NORM",
    "LOSS",
    "LOSS_TIME_AVERAGE",
    "NTK_DIAGONAL",
    "TOP_K_FRACTION",
    "TRACE",
    "WEIGHT",
    "scalar",
    "stderr",
]

# What an estimator measures per term (the weights balance it).
TRACE = "ntk/trace"
GRAD_NORM = "grad_norm"
# What the callback sets and logs.
WEIGHT = "ntk/weight"
LOSS = "loss"
# What LossTimeAverage logs: the running time-average of the weighted training loss.
LOSS_TIME_AVERAGE = "loss/time_average"
# What a PINNModule with causal terms logs per term: the chunk weights (a histogram over time), the
# smallest of them, and the current ε.
CAUSAL_WEIGHTS = "causal/weights"
CAUSAL_MIN_WEIGHT = "causal/min_weight"
CAUSAL_EPSILON = "causal/epsilon"
# What the spectrum monitor logs per term.
EIGENVALUE = "ntk/eig"
EIGENVALUE_HISTOGRAM = "ntk/eig_hist"
CONDITION = "ntk/cond"
EFFECTIVE_RANK = "ntk/effective_rank"
TOP_K_FRACTION = "ntk/top_k_fraction"
# What AdaptiveCollocation logs per term at each scoring: the NTK diagonal over the pool (a histogram),
# the score's spread, the effective share of the pool the density uses, and the sampled density (image).
NTK_DIAGONAL = "ntk/diag"
COLLOCATION_SCORE_PEAK = "collocation/score_max_over_mean"
COLLOCATION_EFFECTIVE_SHARE = "collocation/effective_share"
COLLOCATION_DENSITY = "collocation/density"
# What a PINNModule trained by NTKGaussNewton logs every step: the damping of the kept try, its gain ratio
# and step norm, the loss before and after, the rejected tries, at a cadence K's condition bound, and the
# conjugate-gradient iterations of the matrix-free solver.
GN_DAMPING = "gn/damping"
GN_GAIN_RATIO = "gn/gain_ratio"
GN_STEP_NORM = "gn/step_norm"
GN_LOSS_BEFORE = "gn/loss_before"
GN_LOSS_AFTER = "gn/loss_after"
GN_RETRIES = "gn/retries"
GN_CONDITION = "gn/condition"
GN_CG_ITERATIONS = "gn/cg_iterations"


def scalar(kind: str, term: str) -> str:
    """The tag of one term's value of ``kind`` (one of the constants above)."""
    return f"{kind}/{term}"


def stderr(measure: str, term: str) -> str:
    """The tag of the standard error of a term's measured value."""
    return f"{measure}_stderr/{term}"

"""Per-point squared norms of the residual Jacobian, ``‖∂r_i(x_n)/∂θ‖²``: one module per exact path.

These are the diagonal entries of each NTK block summed over a point's output components, so their
sum over points is the exact block trace ``Tr K_ii = ‖J_i‖_F²``. :func:`per_point_squared_norms`
tries the paths fastest first (:mod:`~lightning_ntk.jacobian.per_point` explains the order):
:mod:`~lightning_ntk.jacobian.gram`, :mod:`~lightning_ntk.jacobian.vmap`,
:mod:`~lightning_ntk.jacobian.loop`, :mod:`~lightning_ntk.jacobian.rows`.
"""

from lightning_ntk.contract import ResidualCaller, trainable_parameters
from lightning_ntk.jacobian.gram import GramUnsupported
from lightning_ntk.jacobian.per_point import (
    MEMORY,
    PATHS,
    PathMemory,
    PathUnavailable,
    PointNorms,
    per_point_squared_norms,
)

__all__ = [
    "MEMORY",
    "PATHS",
    "GramUnsupported",
    "PathMemory",
    "PathUnavailable",
    "PointNorms",
    "ResidualCaller",
    "per_point_squared_norms",
    "trainable_parameters",
]

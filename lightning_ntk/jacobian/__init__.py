"""Per-point squared norms of the residual Jacobian, ``‖∂r_i(x_n)/∂θ‖²``: one module per exact path.

These are the diagonal entries of each NTK block summed over a point's output components, so their
sum over points is the exact block trace ``Tr K_ii = ‖J_i‖_F²``. :func:`per_point_squared_norms`
(:mod:`~lightning_ntk.jacobian.dispatch`, which explains the order) tries the sibling paths fastest
first: :mod:`~lightning_ntk.jacobian.gram`, :mod:`~lightning_ntk.jacobian.vmap`,
:mod:`~lightning_ntk.jacobian.loop`, :mod:`~lightning_ntk.jacobian.rows`. What they share is in
:mod:`~lightning_ntk.jacobian.common`; what they learn about a module is in its
:class:`~lightning_ntk.memory.ModuleMemory`.
"""

from lightning_ntk.contract import ResidualCaller, trainable_parameters
from lightning_ntk.jacobian.common import PathUnavailable, PointNorms
from lightning_ntk.jacobian.dispatch import PATHS, per_point_squared_norms
from lightning_ntk.jacobian.gram import GramUnsupported

__all__ = [
    "PATHS",
    "GramUnsupported",
    "PathUnavailable",
    "PointNorms",
    "ResidualCaller",
    "per_point_squared_norms",
    "trainable_parameters",
]

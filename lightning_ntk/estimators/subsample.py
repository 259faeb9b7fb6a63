"""Point subsampling: exact per-point norms on ``m`` random points, scaled up.

``Tr K_ii ≈ (N_i / m) Σ_{n ∈ S} ‖∂r_i(x_n)/∂θ‖²`` with ``S`` drawn uniformly without replacement
from the ``N_i`` points. Unbiased. Standard error: ``N_i · s / √m · √(1 − m/N_i)`` with ``s`` the
sample standard deviation of the per-point norms (finite-population correction; zero when all
points are taken). Cost: ``m / N_i`` of the exact estimator. Terms that share their points (the same
point count) are evaluated on the same sample.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_ntk.contract import declared_terms, evaluate_residuals
from lightning_ntk.estimators._sampling import sample_points
from lightning_ntk.estimators.base import TraceEstimate, TraceEstimator, check_positive_int, register_estimator
from lightning_ntk.jacobian import per_point_squared_norms

__all__ = ["Subsample", "subsample_traces"]


def subsample_traces(
    module: nn.Module,
    batch: object,
    *,
    num_points: int = 64,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> TraceEstimate:
    """Estimate ``Tr K_ii`` from ``num_points`` random points per term.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch)``.
        batch: The batch ``residuals`` takes.
        num_points: Points drawn per term (all points when a term has fewer).
        generator: Seeds the draw.
        chunk_size: Passed to the exact per-point computation.

    Example:
        >>> import torch
        >>> class Fit(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(1, 1)
        ...     def residuals(self, x):
        ...         return {"data": self.lin(x)}
        >>> x = torch.ones(100, 1)
        >>> est = subsample_traces(Fit(), x, num_points=10, generator=torch.Generator().manual_seed(0))
        >>> est.traces["data"]  # every point has ‖∂r/∂θ‖² = x² + 1 = 2
        tensor(200.)
    """
    check_positive_int(num_points, "num_points")
    reference = evaluate_residuals(module, batch, declared_terms(module))
    device = next(iter(reference.values())).device
    sizes = {r.shape[0] for r in reference.values()}
    indices = {n: sample_points(n, num_points, generator=generator, device=device) for n in sorted(sizes)}
    norms = per_point_squared_norms(module, batch, chunk_size=chunk_size, reference=reference, indices=indices)
    traces, stderr = {}, {}
    for name, values in norms.norms.items():
        size = reference[name].shape[0]
        m = values.numel()
        traces[name] = values.sum() * (size / m)
        if m >= size:
            stderr[name] = torch.zeros_like(traces[name])
        else:
            spread = values.std(correction=1) if m > 1 else torch.full_like(traces[name], float("nan"))
            stderr[name] = size * spread / m**0.5 * (1 - m / size) ** 0.5
    info = {"paths": norms.paths, "points": {n: int(i.numel()) for n, i in indices.items()}}
    return TraceEstimate(traces, stderr, norms.num_rows, "subsample", info)


@register_estimator("subsample")
class Subsample(TraceEstimator):
    """Exact per-point norms on ``num_points`` random points per term, scaled up (:func:`subsample_traces`).

    Example:
        >>> Subsample(num_points=128)
        Subsample(num_points=128, chunk_size=None)
    """

    function = staticmethod(subsample_traces)

    def __init__(self, num_points: int = 64, chunk_size: int | None = None) -> None:
        check_positive_int(num_points, "num_points")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        super().__init__(num_points=num_points, chunk_size=chunk_size)

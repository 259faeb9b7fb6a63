"""Exact NTK block traces: ``Tr K_ii = ‖J_i‖_F² = Σ_n ‖∂r_i(x_n)/∂θ‖²``.

Cost: about one to two training steps when the Gram identities over the recorded parameter uses
apply (:mod:`lightning_ntk.jacobian.gram`: MLPs, any residual style), otherwise one per-point
parameter Jacobian for every point (:mod:`lightning_ntk.jacobian` lists the paths in order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_ntk.estimators.base import TraceEstimate, TraceEstimator, check_positive_int, register_estimator
from lightning_ntk.jacobian import per_point_squared_norms
from lightning_ntk.jacobian.dispatch import PATHS

__all__ = ["Exact", "exact_traces"]


def exact_traces(
    module: nn.Module,
    batch: object,
    *,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    reference: Mapping[str, Tensor] | None = None,
    paths: Sequence[str] | None = None,
) -> TraceEstimate:
    """Exact ``Tr K_ii`` for every term.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch) -> Mapping[str, Tensor]``.
        batch: The batch ``residuals`` takes.
        chunk_size: Points per vectorized chunk (bounds memory); default: 8 MiB of rows on CPU, 1 GiB on GPU.
        generator: Unused; accepted so that every estimator takes the same arguments.
        reference: ``module.residuals(batch)`` if the caller already evaluated it (with its graph).
        paths: Exact paths to try in order, from ``"gram"``, ``"vmap"``, ``"loop"``, ``"rows"``
            (default: all). One path alone is an error where it does not apply.

    Example:
        >>> import torch
        >>> from lightning_ntk.derivatives import partial
        >>> class Tiny(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        ...     def residuals(self, batch):
        ...         x_b, x_r = batch
        ...         return {"bc": self.net(x_b), "pde": partial(self.net, x_r, 0, 0)}
        >>> _ = torch.manual_seed(0)
        >>> est = exact_traces(Tiny(), (torch.tensor([[0.0], [1.0]]), torch.rand(16, 1)))
        >>> sorted(est.traces), est.num_rows
        (['bc', 'pde'], {'bc': 2, 'pde': 16})
    """
    norms = per_point_squared_norms(module, batch, chunk_size=chunk_size, reference=reference, paths=paths)
    traces = {name: v.sum() for name, v in norms.norms.items()}
    stderr = {name: t.new_zeros(()) for name, t in traces.items()}
    return TraceEstimate(traces, stderr, norms.num_rows, "exact", {"paths": norms.paths})


@register_estimator("exact")
class Exact(TraceEstimator):
    """Exact traces (:func:`exact_traces`), by the fastest exact path that applies.

    Args:
        chunk_size: Points per vectorized chunk of the per-point paths (bounds memory); ``None``: automatic.
        paths: Exact paths to try in order (default: all); a single path is an error where it does not apply.

    Example:
        >>> Exact(paths=["gram"])
        Exact(chunk_size=None, paths=('gram',))
    """

    function = staticmethod(exact_traces)
    randomized = False

    def __init__(self, chunk_size: int | None = None, paths: Sequence[str] | None = None) -> None:
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        if paths is not None:
            paths = tuple(paths)
            unknown = [p for p in paths if p not in PATHS]
            if not paths or unknown:
                raise ValueError(f"`paths` must be a non-empty sequence of {list(PATHS)}, got {list(paths)!r}.")
        super().__init__(chunk_size=chunk_size, paths=paths)

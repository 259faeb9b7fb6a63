"""The ``vmap`` path: ``torch.func.vmap`` over points of ``jacrev`` of the per-point residual.

Needs a residual that runs under ``torch.func`` (input derivatives from
:mod:`lightning_ntk.derivatives` or ``torch.func``). Work: one per-point parameter Jacobian for every
point; memory ≈ ``chunk × rows-per-point × P`` floats.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from lightning_ntk.contract import ResidualCaller, check_residuals
from lightning_ntk.jacobian.common import GroupJob, NotPointwise, check_point_values, reports_skips, select

__all__ = ["vmap_norms"]


@reports_skips("vmap", retry_other_errors=False)
def vmap_norms(module: nn.Module, job: GroupJob) -> dict[str, Tensor]:
    """Per-point squared norms of the terms of one point group, ``vmap`` over points in chunks (or
    :class:`~lightning_ntk.jacobian.common.Skipped`: the residual does not run under ``torch.func``,
    or is not pointwise)."""
    split, terms, reference, params = job.split, job.group, job.reference, job.params
    chunk_size, index, shrink_others = job.chunk, job.index, job.shrink
    caller = ResidualCaller(module)
    prefixed = {f"inner.{name}": p.detach() for name, p in params.items()}

    def outputs(p: dict[str, Tensor], *points: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        batch = split.build([x.unsqueeze(0) for x in points], shrink_others, detach=True)
        out = check_residuals(functional_call(caller, p, (batch,)), None, require_grad=False)
        rows = []
        for name in terms:
            r = out[name]
            if r.shape[0] != 1:
                raise NotPointwise(f"term {name!r} keeps {r.shape[0]} rows when its points are split")
            rows.append(r.reshape(-1))
        rows_t = tuple(rows)
        return rows_t, tuple(r.detach() for r in rows_t)

    def per_point(*points: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        jac, values = jacrev(outputs, has_aux=True)(prefixed, *points)
        norms = tuple(sum(g.square().sum() for g in jt.values()) for jt in jac)
        return norms, values

    norms, values = vmap(per_point, chunk_size=chunk_size)(*split.mapped_leaves(index))
    for name, v in zip(terms, values, strict=True):
        check_point_values(name, v, select(reference[name], index))
    return dict(zip(terms, norms, strict=True))

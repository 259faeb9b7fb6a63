"""The ``loop`` path: one residual evaluation per point and one ``torch.autograd.grad`` per row.

Works with residuals in any style, including ordinary autograd input derivatives
(``requires_grad_`` + ``torch.autograd.grad(create_graph=True)``); the slowest pointwise path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ntk.contract import evaluate_residuals
from lightning_ntk.jacobian.common import (
    GroupJob,
    NotPointwise,
    check_point_values,
    point_ids,
    reports_skips,
    row_norms,
)

__all__ = ["loop_norms"]


@reports_skips("loop", retry_other_errors=True)
def loop_norms(module: nn.Module, job: GroupJob) -> dict[str, Tensor]:
    """Per-point squared norms of the terms of one point group, one point at a time (or
    :class:`~lightning_ntk.jacobian.common.Skipped`: the residual is not pointwise, or fails on a
    single point, as a term that slices the point tensor does)."""
    split, terms, reference, params, index, shrink_others = (
        job.split, job.group, job.reference, job.params, job.index, job.shrink
    )  # fmt: skip
    plist = list(params.values())
    norms: dict[str, list[Tensor]] = {name: [] for name in terms}
    leaves = [t for t, m in zip(split.leaves, split.mapped, strict=True) if m]
    for n in point_ids(split.size, index):
        points = []
        for leaf in leaves:
            # A fresh leaf per point keeps the user's `requires_grad_` calls legal and local.
            p = leaf[n : n + 1].detach().clone()
            points.append(p.requires_grad_(leaf.requires_grad))
        out = evaluate_residuals(module, split.build(points, shrink_others, detach=False))
        for name in terms:
            r = out[name]
            if r.shape[0] != 1:
                raise NotPointwise(f"term {name!r} keeps {r.shape[0]} rows when its points are split")
            check_point_values(name, r.detach().reshape(-1), reference[name][n])
            norms[name].append(row_norms(r.reshape(-1), plist).detach())
    return {name: torch.stack(v) for name, v in norms.items()}

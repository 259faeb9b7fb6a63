"""The ``rows`` path: one VJP per residual row through the graph of the whole batch.

Needs nothing about how the batch holds its points (residuals whose row ``n`` depends on other
points too); the slowest path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ntk.jacobian.common import GroupJob, point_ids, row_norms

__all__ = ["rows_norms"]


def rows_norms(job: GroupJob) -> dict[str, Tensor]:
    """Per-point squared norms from the full-batch residuals (with their graph)."""
    plist = list(job.params.values())
    out = {}
    for name in job.group:
        flat = job.reference[name].reshape(job.reference[name].shape[0], -1)
        out[name] = torch.stack([row_norms(flat[n], plist).detach() for n in point_ids(flat.shape[0], job.index)])
    return out

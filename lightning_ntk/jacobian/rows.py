"""The ``rows`` path: one VJP per residual row through the graph of the whole batch.

Needs nothing about how the batch holds its points (residuals whose row ``n`` depends on other
points too); the slowest path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_ntk.jacobian.common import point_ids, row_norms

__all__ = ["rows_norms"]


def rows_norms(
    reference: Mapping[str, Tensor], terms: list[str], params: dict[str, Tensor], index: Tensor | None
) -> dict[str, Tensor]:
    """Per-point squared norms from the full-batch residuals (with their graph)."""
    plist = list(params.values())
    out = {}
    for name in terms:
        flat = reference[name].reshape(reference[name].shape[0], -1)
        out[name] = torch.stack([row_norms(flat[n], plist).detach() for n in point_ids(flat.shape[0], index)])
    return out

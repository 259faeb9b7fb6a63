"""The ``vmap`` path: ``torch.func.vmap`` over points of ``jacrev`` of the per-point residual.

Needs a residual that runs under ``torch.func`` (input derivatives from
:mod:`lightning_ntk.derivatives` or ``torch.func``). Work: one per-point parameter Jacobian for every
point; memory ≈ ``chunk × rows-per-point × P`` floats.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from lightning_ntk.contract import ResidualCaller, check_residuals
from lightning_ntk.points import PointSplit, close

__all__ = ["NotPointwise", "check_point_values", "default_chunk_size", "select", "vmap_norms"]

# Per-chunk budget for the per-point Jacobian rows when `chunk_size` is not given. On CPU small
# chunks that stay in cache win (3x256 MLP, N=4096: 6.3 s with 16 points per chunk, 19 s with 256);
# on GPU large chunks keep the device busy.
_CPU_CHUNK_BYTES = 1 << 23
_GPU_CHUNK_BYTES = 1 << 30


class NotPointwise(Exception):
    """The per-point evaluation does not reproduce the full-batch residual."""


def check_point_values(name: str, got: Tensor, want: Tensor) -> None:
    """Raise :class:`NotPointwise` unless per-point values equal the full-batch residual's rows."""
    if not close(got, want):
        raise NotPointwise(f"per-point values of term {name!r} differ from the full-batch residual")


def select(values: Tensor, index: Tensor | None) -> Tensor:
    return values if index is None else values[index.to(values.device)]


def default_chunk_size(num_params: int, rows_per_point: int, itemsize: int, device: torch.device) -> int:
    budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    return max(1, budget // (num_params * max(rows_per_point, 1) * itemsize))


def vmap_norms(
    module: nn.Module,
    split: PointSplit,
    terms: list[str],
    reference: Mapping[str, Tensor],
    params: dict[str, Tensor],
    chunk_size: int,
    index: Tensor | None,
    shrink_others: bool,
) -> dict[str, Tensor]:
    """Per-point squared norms of the terms of one point group, ``vmap`` over points in chunks."""
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

"""Subsets of a batch's points: slicing every tensor that holds one row per point.

A batch is any nesting of tuples, lists and dicts; a tensor whose leading dimension is a term's point
count ``N`` is taken to hold one row per point of the terms with ``N`` points (the same inference the
exact path uses, see :mod:`lightning_ntk.jacobian`). Callers that rely on it check it against the
full-batch residuals once (:func:`check_point_layout`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["batch_signature", "check_point_layout", "subsample_batch"]

_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, dict[str, int]]] = weakref.WeakKeyDictionary()


def batch_signature(batch: object) -> tuple:
    """Shapes, dtypes and devices of the batch's tensors (the layout cache key)."""
    leaves, spec = tree_flatten(batch)
    return (
        str(spec),
        tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else type(t) for t in leaves),
    )


def subsample_batch(batch: object, indices: Mapping[int, Tensor]) -> object:
    """The batch with every tensor of leading size ``N`` cut to ``indices[N]`` (same ids for all of them)."""
    leaves, spec = tree_flatten(batch)
    out = []
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] in indices:
            leaf = leaf[indices[leaf.shape[0]].to(leaf.device)]
        out.append(leaf)
    return tree_unflatten(out, spec)


def check_point_layout(
    module: nn.Module,
    batch: object,
    evaluate: Callable[[object], Mapping[str, Tensor]],
    generator: torch.Generator | None,
    sample: Callable[[int], Tensor],
) -> dict[str, int]:
    """Point count of every term, checked once per module and batch layout, then cached.

    The check evaluates the residuals on the full batch and on a random subset of its points and
    demands that the subset's rows equal the full rows at those points; a residual whose row ``n``
    depends on other points (or a batch whose layout the inference gets wrong) is a clear error.
    """
    key = batch_signature(batch)
    cache = _LAYOUTS.setdefault(module, {})
    if key in cache:
        return cache[key]
    full = evaluate(batch)
    layout = {name: r.shape[0] for name, r in full.items()}
    indices = {n: sample(n) for n in sorted(set(layout.values()))}
    part = evaluate(subsample_batch(batch, indices))
    for name, r in part.items():
        want = full[name][indices[layout[name]].to(full[name].device)]
        scale = float(want.abs().max()) if want.numel() else 0.0
        if r.shape != want.shape or not torch.allclose(r, want, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
            raise ValueError(
                f"Point subsampling does not reproduce the residual of term {name!r}: its row n must depend "
                "only on point n, and every tensor in the batch with that term's point count must hold one "
                "row per point. Use points_per_probe=None for this module."
            )
    cache[key] = layout
    return layout

"""How a batch holds its points (the tolerance that decides whether a residual is pointwise is
:data:`~lightning_ntk.tolerances.POINTWISE_RTOL`, re-exported here).

A batch is any nesting of tuples, lists and dicts; a tensor whose leading dimension is a term's point
count ``N`` is taken to hold one row per point of the terms with ``N`` points. Every user of this
inference (the exact paths of :mod:`lightning_ntk.jacobian`, point subsampling) checks it against the
full-batch residuals with :data:`POINTWISE_RTOL`, so a layout it gets wrong costs time, never a wrong
number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_ntk.memory import memory_of
from lightning_ntk.tolerances import POINTWISE_RTOL, close

__all__ = [
    "POINTWISE_RTOL",
    "PointSplit",
    "batch_signature",
    "check_point_counts",
    "close",
    "known_point_counts",
    "pointwise",
    "subsample_batch",
]


def known_point_counts(module: nn.Module, batch: object) -> dict[str, int] | None:
    """The point count of every term once :func:`check_point_counts` confirmed it, else ``None``."""
    return memory_of(module).point_counts.get(batch_signature(batch))


def pointwise(module: nn.Module, batch: object) -> bool:
    """False once :func:`check_point_counts` found the residuals not pointwise for this batch signature."""
    counts = memory_of(module).point_counts
    key = batch_signature(batch)
    return key not in counts or counts[key] is not None


def batch_signature(batch: object) -> tuple:
    """Shapes, dtypes and devices of the batch's tensors (the key of everything learned per batch signature)."""
    leaves, spec = tree_flatten(batch)
    return (
        str(spec),
        tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, Tensor) else type(t) for t in leaves),
    )


class PointSplit:
    """Builds the batch for a subset of the points of one group (the terms with ``size`` points)."""

    def __init__(self, batch: object, size: int, other_sizes: set[int]) -> None:
        self.leaves, self.spec = tree_flatten(batch)
        self.size = size
        self.mapped = [isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == size for t in self.leaves]
        self.other = [
            isinstance(t, Tensor) and t.ndim > 0 and not m and t.shape[0] in other_sizes
            for t, m in zip(self.leaves, self.mapped, strict=True)
        ]

    @property
    def splittable(self) -> bool:
        return any(self.mapped)

    def mapped_leaves(self, index: Tensor | None = None) -> list[Tensor]:
        leaves = [t.detach() for t, m in zip(self.leaves, self.mapped, strict=True) if m]
        return leaves if index is None else [t[index.to(t.device)] for t in leaves]

    def build(self, points: Sequence[Tensor], shrink_others: bool, detach: bool) -> object:
        """The batch with the group's tensors replaced by ``points`` (and other groups' cut to one row)."""
        it = iter(points)
        leaves = []
        for leaf, mapped, other in zip(self.leaves, self.mapped, self.other, strict=True):
            if mapped:
                leaf = next(it)
            elif shrink_others and other:
                leaf = leaf[:1]
            if detach and isinstance(leaf, Tensor):
                leaf = leaf.detach()
            leaves.append(leaf)
        return tree_unflatten(leaves, self.spec)


def subsample_batch(batch: object, indices: Mapping[int, Tensor]) -> object:
    """The batch with every tensor of leading size ``N`` cut to ``indices[N]`` (same ids for all of them)."""
    leaves, spec = tree_flatten(batch)
    out = []
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.ndim > 0 and leaf.shape[0] in indices:
            leaf = leaf[indices[leaf.shape[0]].to(leaf.device)]
        out.append(leaf)
    return tree_unflatten(out, spec)


def check_point_counts(
    module: nn.Module,
    batch: object,
    evaluate: Callable[[object], Mapping[str, Tensor]],
    sample: Callable[[int], Tensor],
) -> dict[str, int]:
    """Point count of every term, checked once per module and batch signature, then kept in the
    module's :class:`~lightning_ntk.memory.ModuleMemory` (a failed check too).

    The check evaluates the residuals on the full batch and on a random subset of its points and
    demands that the subset's rows equal the full rows at those points; a residual whose row ``n``
    depends on other points (or a batch whose layout the inference gets wrong) is a clear error.
    """
    known = known_point_counts(module, batch)
    if known is not None:
        return known
    counts = memory_of(module).point_counts
    full = evaluate(batch)
    points = {name: r.shape[0] for name, r in full.items()}
    indices = {n: sample(n) for n in sorted(set(points.values()))}
    try:
        part = evaluate(subsample_batch(batch, indices))
    except Exception as err:  # the full batch evaluated: the cut is what the residual does not survive
        counts[batch_signature(batch)] = None
        raise ValueError(
            "Point subsampling does not apply: the residual fails on a random subset of the batch's points "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); a term that "
            "slices the point tensor (e.g. x[:4]) cannot be subsampled."
        ) from err
    for name, r in part.items():
        want = full[name][indices[points[name]].to(full[name].device)]
        if r.shape != want.shape or not close(r, want):
            counts[batch_signature(batch)] = None
            raise ValueError(
                f"Point subsampling does not reproduce the residual of term {name!r}: its row n must depend "
                "only on point n, and every tensor in the batch with that term's point count must hold one "
                "row per point."
            )
    counts[batch_signature(batch)] = points
    return points

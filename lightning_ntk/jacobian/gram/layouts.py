"""Where the points sit in each recorded use, decided once per module and batch signature, and what is
kept of that decision.

The axis of a product's output that holds a term's points is inferred from shapes
(:func:`choose_layout` tries each candidate) and confirmed by a second backward with random per-point
seeds: the gradient of ``Σ_n w_n r_n`` must equal ``w_n`` times that of ``Σ_n r_n`` on every row of
point ``n``. What was confirmed is one :class:`GramEntry` per module and batch signature: a
:class:`UsePlan` per (term, component, use), the groups of terms that share one backward, and where
each of those backwards is cut.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_ntk.jacobian.gram.graph import NodePath
from lightning_ntk.jacobian.gram.recording import GramUnsupported, Use, UseKind
from lightning_ntk.jacobian.gram.walking import WalkPlan
from lightning_ntk.tolerances import POINTWISE_RTOL

__all__ = ["GramEntry", "Layout", "Split", "UseKey", "UsePlan", "choose_layout"]


class Split(Enum):
    """How the point axis of a tensor holds a term's ``N`` points."""

    POINT_MAJOR = "n"  # (…, N, S, …): each point's S rows together
    POINT_MINOR = "s"  # (…, S, N, …): S blocks of all N points
    BLOCK = "b"  # this term's N points as one block among other terms' rows


class UseKey(NamedTuple):
    """A confirmed layout is per term, output component of a point, and recorded use."""

    term: str
    component: int
    use: int


@dataclass(frozen=True)
class Layout:
    """Where the points sit in a tensor along ``axis``.

    ``split``: :class:`Split` — ``POINT_MINOR`` (…, S, N, …) or ``POINT_MAJOR`` (…, N, S, …) when the
    axis holds ``S`` rows per point; ``BLOCK`` when it holds this term's points as one block at
    ``offset`` among other terms' rows (one network evaluation on the concatenation of several terms'
    points).
    """

    axis: int
    split: Split
    offset: int = 0

    def points_first(self, t: Tensor, n: int) -> Tensor:
        """``t`` as ``(N, rest...)`` with point ``p`` in row ``p``."""
        if self.split is Split.BLOCK:
            return t.narrow(self.axis, self.offset, n).movedim(self.axis, 0)
        if n == 1:
            return t.unsqueeze(0)
        size = t.shape[self.axis]
        if self.axis == 0 and size == n:  # already points first: no view op (each is a dispatch)
            return t
        shape = list(t.shape)
        if self.split is Split.POINT_MINOR:
            shape[self.axis : self.axis + 1] = [size // n, n]
            return t.reshape(shape).movedim(self.axis + 1, 0)
        shape[self.axis : self.axis + 1] = [n, size // n]
        return t.reshape(shape).movedim(self.axis, 0)


def _candidates(shape: tuple[int, ...], axes: range | list[int], n: int, fixed: Callable[[int], bool]) -> list[Layout]:
    if n == 1:
        return [Layout(0, Split.POINT_MAJOR)]
    out = []
    for axis in axes:
        size = shape[axis]
        if size % n or not fixed(axis):
            continue
        out.append(Layout(axis, Split.POINT_MAJOR))
        if size != n:
            out.append(Layout(axis, Split.POINT_MINOR))
    return out


def _broadcast_free(index: Tensor, shape: tuple[int, ...]) -> Callable[[int], bool]:
    """Whether the parameter operand is constant along an axis of the output (it is broadcast there)."""
    offset = len(shape) - index.ndim

    def fixed(axis: int) -> bool:
        a = axis - offset
        return a < 0 or index.shape[a] == 1 or index.stride(a) == 0

    return fixed


def _point_axes(use: Use) -> tuple[list[int], Callable[[int], bool]]:
    """Axes of the output that may hold points, and whether the parameter is constant along each."""
    shape = tuple(use.output.shape)
    if use.kind is UseKind.ELEMENTWISE:
        return list(range(len(shape))), _broadcast_free(use.index, shape)
    # Products: the points are among the batch dims and the rows (right) or columns (left) of the
    # output, along which the parameter operand never varies.
    batch = len(shape) - 2
    lead = [*range(batch), batch if use.kind is UseKind.RIGHT else batch + 1]
    in_batch = _broadcast_free(use.index[..., 0, 0], shape[:batch])
    return lead, lambda axis: axis >= batch or in_batch(axis)


def _use_candidates(use: Use, n: int, grad: Tensor) -> list[Layout]:
    axes, fixed = _point_axes(use)
    out = _candidates(tuple(use.output.shape), axes, n, fixed)
    for axis in axes:
        size = grad.shape[axis]
        if size > n and fixed(axis):
            # A block of this term's points among other rows: it starts at the first row with a gradient.
            busy = grad.movedim(axis, 0).reshape(size, -1).abs().sum(1) > 0
            first = int(busy.nonzero()[0, 0]) if bool(busy.any()) else 0
            if first + n <= size:
                out.append(Layout(axis, Split.BLOCK, first))
    return out


def choose_layout(use: Use, grad: Tensor, seeded: Tensor, weights: Tensor, n: int) -> Layout:
    # A non-finite point poisons its own rows (0·NaN in the backward), never another point's: the
    # layout is decided on the finite rows, and the norms keep the NaN at that point only.
    grad, seeded = _finite_or_zero(grad), _finite_or_zero(seeded)
    scale = seeded.norm()
    for layout in _use_candidates(use, n, grad):
        g = layout.points_first(grad, n).reshape(n, -1)
        s = layout.points_first(seeded, n).reshape(n, -1)
        # Rounding leaves ~1e-7 (float32); a wrong layout ~0.2 (the seeds are uniform on [1, 2)). A
        # block must also hold all of the gradient: rows outside it belong to no point of this term.
        outside = (seeded.norm() ** 2 - s.norm() ** 2).clamp_min(0).sqrt() if layout.split is Split.BLOCK else 0.0
        if (s - weights[:, None] * g).norm() + outside <= POINTWISE_RTOL * scale:
            return layout
    raise GramUnsupported(
        f"the rows of an aten product on {use.name!r} do not map to the points of a term (rows mix points)"
    )


def _finite_or_zero(t: Tensor) -> Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class UsePlan:
    """What one use needs on every call, worked out once: where the points sit, and the constants
    that would otherwise be read from the index maps each time (on the device, so a warm call neither
    waits for it nor copies from host memory).

    Attributes:
        layout: Where the term's points sit in the use's output.
        same: For a product: whether the operand is the parameter itself (``True``) or its transpose.
        flat_index: For an elementwise use: the parameter entry of each of a point's gradient entries
            (``None`` with ``identity``: entry ``j`` is parameter entry ``j``, as for a bias).
        identity: For an elementwise use: a point's gradient entries are the parameter's, in order.
        factor_along: For a factored weight ``exp(S) ⊙ V``: 0 if ``S`` scales rows of ``V``, 1 columns.
        factor_frame: For a factored weight: the entry of ``V`` that each entry of the operand is.
        factor_index: For a factored weight: the entry of ``S`` for each row (or column) of ``V``.
    """

    layout: Layout
    same: bool = True
    flat_index: Tensor | None = None
    identity: bool = False
    factor_along: int | None = None
    factor_frame: Tensor | None = None
    factor_index: Tensor | None = None


@dataclass
class GramEntry:
    """What one module and batch signature confirmed.

    Attributes:
        fingerprint: The uses it saw (:func:`~lightning_ntk.jacobian.gram.recording.fingerprint`);
            another fingerprint confirms everything again.
        plans: A :class:`UsePlan` per (term, component, use) whose gradient is not zero.
        groups: Terms whose recorded uses are disjoint, so that one backward of the sum of their rows
            (per output component) gives each its own gradients.
        unsupported: Terms the identities do not cover, with the reason (their rows mix points).
        cuts: (group position, component) → where that backward is cut (:mod:`~lightning_ntk.jacobian.gram.cuts`).
        walk: How a warm call finds the uses in the graph of a plain evaluation
            (:mod:`~lightning_ntk.jacobian.gram.walking`); ``None``: the recorder runs.
        workspace: Buffers of the accumulation, reused by every call with this layout
            (:func:`~lightning_ntk.jacobian.gram.accumulation.term_norms`).
    """

    fingerprint: tuple
    plans: dict[UseKey, UsePlan] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    cuts: dict[tuple[int, int], tuple[NodePath, ...]] = field(default_factory=dict)
    walk: WalkPlan | None = None
    workspace: dict[tuple, Tensor] = field(default_factory=dict, repr=False)
    _planned: dict[tuple, tuple] = field(default_factory=dict, repr=False)

    def planned(self, term: str, component: int) -> tuple[tuple[int, UsePlan], ...]:
        """``(use, plan)`` of every use with a plan for ``term`` and ``component``, in use order: a warm
        call looks these up instead of a key per use, term and component."""
        key = (term, component)
        found = self._planned.get(key)
        if found is None:
            found = tuple(sorted(((k.use, p) for k, p in self.plans.items() if k[:2] == key), key=lambda up: up[0]))
            self._planned[key] = found
        return found

"""Backward passes per output component that skip the branches only other components reach.

A residual with several output components is often assembled from one row per component,
``torch.stack([r_p, r_q], 1)``. The backward of component ``p`` alone (``Σ_n r_n[p]``) then gets a
gradient of zeros for ``r_q`` from the stack, and autograd, which cannot know they are zeros, runs
them through the whole graph of ``r_q``: every component's backward costs as much as the backward of
all of them (measured on the 2-D two-output benchmark: 0.34 of a training step each), and every
parameter use in ``r_q``'s graph gets a zero gradient that the Gram products then multiply.

A **cut** is a node of the autograd graph where that stops. It is found once per module and batch
layout (:func:`find_cuts`) and located again in each new graph by its path from a residual
(:func:`locate`); a warm backward starts each cut node with no gradient at all (a node pre-hook), so
autograd skips everything below it that component ``c`` does not reach, and the uses there come back
as ``None`` (:func:`backward`).

When a node is cut from component ``c`` (all three hold on the confirming batch):

1. a backward of component ``c`` with a NaN cotangent leaves it without NaN (:func:`reached`): no path
   from ``c`` reaches it (NaN survives a multiplication by zero, so a zero weight does not hide a path);
2. a backward of another component reaches it;
3. every parent that ``c`` reaches is a node that hands each input its own slice of the gradient
   (:data:`SPLITTING`: the ``stack`` or ``cat`` that assembled the rows). The zeros there come from
   the cotangent's other columns, so they are zeros for every batch, not a mask of this batch
   (``relu`` of a component that is negative everywhere on one batch is never cut).

The gradient arriving at a cut is still checked on every warm call, on the device: if it is not
zero, the norms of the terms sharing that backward are made NaN (never silently wrong), and the
callback reports non-finite traces for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["SPLITTING", "Cut", "Graph", "backward", "find_cuts", "locate", "reached"]

# Backward nodes that give each input its own part of the incoming gradient (and nothing else).
SPLITTING = frozenset({"StackBackward0", "CatBackward0"})

# Gradients of one backward, aligned with its inputs (None: not reached).
Grads = tuple[Tensor | None, ...]


class Cut(NamedTuple):
    """Where a cut node sits: the residual it is reached from, then ``(edge, node name)`` per hop."""

    root: int
    steps: tuple[tuple[int, str], ...]


class Graph:
    """The autograd graph below some residuals, walked breadth first (so paths are shortest).

    Attributes:
        nodes: Every node, in the order found.
        parents: Node position → positions of the nodes with an edge into it.
        via: Node position → how it was first reached: ``(parent position, edge)``, or
            ``(-1 - root, -1)`` for the node of residual ``root``.
    """

    def __init__(self, roots: Sequence[Tensor]) -> None:
        self.nodes: list = []
        self.index: dict = {}
        self.parents: dict[int, list[int]] = {}
        self.via: dict[int, tuple[int, int]] = {}
        frontier = []
        for k, r in enumerate(roots):
            if r.grad_fn is not None and r.grad_fn not in self.index:
                self._add(r.grad_fn, (-1 - k, -1))
                frontier.append(r.grad_fn)
        while frontier:
            following = []
            for node in frontier:
                i = self.index[node]
                for edge, (child, _) in enumerate(node.next_functions):
                    if child is None:
                        continue
                    j = self.index.get(child)
                    if j is None:
                        j = self._add(child, (i, edge))
                        following.append(child)
                    self.parents.setdefault(j, []).append(i)
            frontier = following

    def _add(self, node, via: tuple[int, int]) -> int:
        i = self.index[node] = len(self.nodes)
        self.nodes.append(node)
        self.via[i] = via
        return i

    def path(self, i: int) -> Cut:
        steps = []
        while True:
            parent, edge = self.via[i]
            if edge < 0:
                return Cut(-1 - parent, tuple(reversed(steps)))
            steps.append((edge, self.nodes[i].name()))
            i = parent


def reached(graph: Graph, output: Tensor, inputs: Sequence[Tensor]) -> set[int]:
    """The nodes that a backward of ``output`` (a scalar) to ``inputs`` sends a NaN to from a NaN cotangent."""
    seen: list[tuple[int, Tensor]] = []

    def hook(i: int):
        def record(grads):
            found = [torch.isnan(g).any() for g in grads if g is not None]
            if found:
                seen.append((i, torch.stack(found).any()))

        return record

    handles = [node.register_prehook(hook(i)) for i, node in enumerate(graph.nodes)]
    try:
        if output.requires_grad and inputs:
            nan = torch.full_like(output, float("nan"))
            torch.autograd.grad(output, list(inputs), grad_outputs=nan, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return set()
    flags = torch.stack([f for _, f in seen]).tolist()  # one host read for the whole graph
    return {i for (i, _), hit in zip(seen, flags, strict=True) if hit}


def find_cuts(graph: Graph, mine: set[int], others: set[int]) -> list[int]:
    """The nodes to cut from a backward that reaches ``mine`` when other components reach ``others``:
    reached by another component, not by this one, and entered from this one only through
    :data:`SPLITTING` nodes."""
    cuts = []
    for i in sorted(others - mine):
        entered = [p for p in graph.parents.get(i, []) if p in mine]
        if entered and all(graph.nodes[p].name() in SPLITTING for p in entered):
            cuts.append(i)
    return cuts


def locate(cuts: Sequence[Cut], roots: Sequence[Tensor]) -> list | None:
    """The nodes of this call's graph at ``cuts``, or ``None`` if a path leads elsewhere (the graph
    is not the one the cuts were found in)."""
    nodes = []
    for cut in cuts:
        if cut.root >= len(roots) or roots[cut.root].grad_fn is None:
            return None
        node = roots[cut.root].grad_fn
        for edge, name in cut.steps:
            following = node.next_functions
            if edge >= len(following) or following[edge][0] is None or following[edge][0].name() != name:
                return None
            node = following[edge][0]
        nodes.append(node)
    return nodes


def backward(output: Tensor, inputs: Sequence[Tensor], cut: Sequence = (), arriving: list | None = None) -> Grads:
    """Gradients of ``output`` at ``inputs`` (``None`` where not reached), with the ``cut`` nodes given
    no gradient; what arrives at them is tested for nonzero values into ``arriving`` (device bools)."""
    if not inputs or not output.requires_grad:
        return (None,) * len(inputs)

    def drop(grads):
        if arriving is not None:
            arriving.extend(g.ne(0).any() for g in grads if g is not None)
        return (None,) * len(grads)

    handles = [node.register_prehook(drop) for node in cut]
    try:
        return torch.autograd.grad(output, list(inputs), retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()

"""Backward passes per output component that skip the branches only other components reach.

A residual with several output components is often assembled from one row per component,
``torch.stack([r_p, r_q], 1)``. The backward of component ``p`` alone (``Σ_n r_n[p]``) then gets a
gradient of zeros for ``r_q`` from the stack, and autograd, which cannot know they are zeros, runs
them through the whole graph of ``r_q``: every component's backward costs as much as the backward of
all of them (measured on the 2-D two-output benchmark: 0.34 of a training step each), and every
parameter use in ``r_q``'s graph gets a zero gradient that the Gram products then multiply.

A **cut** is a node of the autograd graph where that stops. It is found once per module and batch
layout (:func:`find_cuts`) and located again in each new graph by its path from a residual
(:func:`~.graph.locate`); a warm backward starts each cut node with no gradient at all (a node pre-hook), so
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

import torch
from torch import Tensor

from lightning_ntk.jacobian.gram.graph import Graph

__all__ = ["SPLITTING", "backward", "find_cuts", "reached"]

# Backward nodes that give each input its own part of the incoming gradient (and nothing else).
SPLITTING = frozenset({"StackBackward0", "CatBackward0"})

# Gradients of one backward, aligned with its inputs (None: not reached).
Grads = tuple[Tensor | None, ...]


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


def backward(
    output: Tensor, inputs: Sequence[Tensor], cut: Sequence = (), arriving: list | None = None, retain: bool = True
) -> Grads:
    """Gradients of ``output`` at ``inputs`` (``None`` where not reached), with the ``cut`` nodes given
    no gradient; what arrives at them is tested for nonzero values into ``arriving`` (device bools).
    ``retain=False`` frees the graph's saved tensors on the way (the caller's last backward)."""
    if not inputs or not output.requires_grad:
        return (None,) * len(inputs)

    def drop(grads):
        if arriving is not None:
            arriving.extend(g.ne(0).any() for g in grads if g is not None)
        return (None,) * len(grads)

    handles = [node.register_prehook(drop) for node in cut]
    try:
        return torch.autograd.grad(output, list(inputs), retain_graph=retain, allow_unused=True)
    finally:
        for h in handles:
            h.remove()

"""The autograd graph below a call's residuals, and paths that find a node again in a later call's graph.

A warm call builds a new graph; what was learned about the confirming call's graph (where to cut a
component's backward, :mod:`~.cuts`; where each parameter use is, :mod:`~.walking`) is kept as positions
in a breadth-first walk or as paths of ``(edge, node name)`` from a residual, and found again by
walking or following them, each step checked by the node's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

__all__ = ["Graph", "NodePath", "breadth_first", "locate"]


class NodePath(NamedTuple):
    """Where a node sits: the residual it is reached from, then ``(edge, node name)`` per hop."""

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
        self.nodes: list = breadth_first(roots)
        self.index: dict = {node: i for i, node in enumerate(self.nodes)}
        self.parents: dict[int, list[int]] = {}
        self.via: dict[int, tuple[int, int]] = {}
        for k, r in enumerate(roots):
            if r.grad_fn is not None:
                self.via.setdefault(self.index[r.grad_fn], (-1 - k, -1))
        # In node order, the first parent to reach a node is the one the breadth-first walk came from.
        for i, node in enumerate(self.nodes):
            for edge, (child, _) in enumerate(node.next_functions):
                if child is not None:
                    j = self.index[child]
                    self.via.setdefault(j, (i, edge))
                    self.parents.setdefault(j, []).append(i)

    def path(self, i: int) -> NodePath:
        steps = []
        while True:
            parent, edge = self.via[i]
            if edge < 0:
                return NodePath(-1 - parent, tuple(reversed(steps)))
            steps.append((edge, self.nodes[i].name()))
            i = parent


def breadth_first(roots: Sequence[Tensor]) -> list:
    """The nodes below ``roots``, breadth first (the roots' nodes, then each level in edge order): the
    order of :class:`Graph`, and all a warm call's walk needs of it, at about half its cost."""
    nodes = []
    seen = set()
    for r in roots:
        node = r.grad_fn
        if node is not None and node not in seen:
            seen.add(node)
            nodes.append(node)
    start = 0
    while start < len(nodes):
        end = len(nodes)
        for node in nodes[start:end]:
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    nodes.append(child)
        start = end
    return nodes


def locate(paths: Sequence[NodePath], roots: Sequence[Tensor]) -> list | None:
    """The nodes of this call's graph at ``paths``, or ``None`` if a path leads elsewhere (the graph
    is not the one the paths were taken in)."""
    nodes = []
    for path in paths:
        if path.root >= len(roots) or roots[path.root].grad_fn is None:
            return None
        node = roots[path.root].grad_fn
        for edge, name in path.steps:
            following = node.next_functions
            if edge >= len(following) or following[edge][0] is None or following[edge][0].name() != name:
                return None
            node = following[edge][0]
        nodes.append(node)
    return nodes

"""Finding the recorded parameter uses again in the autograd graph of a plain evaluation.

The recorder (:mod:`~.recording`) runs the residual under a ``TorchDispatchMode``: Python code for
every aten op, which costs 0.04–0.17 of a training step on a CPU (``benchmarks/exact_cost.py``) and
most of an eager GPU call. Once a layout is confirmed, a warm call needs of each use only two tensors
of this evaluation: the other operand of the product, and where to ask autograd for the gradient at
the product's output. Both are in the autograd graph the evaluation builds anyway: the use's output
was made by a node (its ``grad_fn``), which saved the other operand to compute the parameter's
gradient (``_saved_mat1``, ``_saved_self``, ...), and ``GradientEdge(node, output_nr)`` is a valid
input of ``torch.autograd.grad``.

:func:`plan_walk` decides, on the confirming call, whether that holds for every use, comparing what the
recorder saw with what the graph holds: the node of each output, the saved attribute that *is* the
recorded operand (same storage, offset, shape and strides). A use whose operand carries a number read
during the evaluation (a scaling, an ``exp`` weight factorization) is left to the recorder, since the
graph does not show the number. :func:`walk_uses` follows the plan on a warm call: the graph is walked
breadth first and accepted only if it has the confirmed node names in the confirmed order and every
parameter leaf at its place, and then each use takes its operand from its node. (The forward of a
network compiled with ``torch.compile`` is one node that hides its products: there the walk does not
find the planned graph, and the recorder runs, as before.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from torch import Tensor
from torch.autograd.graph import GradientEdge

from lightning_ntk.jacobian.gram.cuts import Graph
from lightning_ntk.jacobian.gram.recording import Use

__all__ = ["WalkPlan", "plan_walk", "walk_uses"]

# Scalars saved with a node that multiply an operand: a walk requires them to stay 1.
_SCALARS = ("_saved_alpha", "_saved_beta")


@dataclass(frozen=True)
class _Site:
    """Where one recorded use is in the graph: the node that made its output, which of the node's
    outputs it is, and the node's saved attribute holding the other operand (``None``: none)."""

    node: int
    output_nr: int
    other: str | None


@dataclass(frozen=True)
class WalkPlan:
    """What a walk must find to stand in for the recorder.

    Attributes:
        names: Every node's name, in the breadth-first order of :class:`~.cuts.Graph`.
        leaves: ``(position, parameter name)`` of every parameter's gradient accumulator.
        sites: Per recorded use, where it is (``None``: no gradient reaches its output from the residuals).
        uses: The recorded uses without their tensors (what a walked use keeps of them).
    """

    names: tuple[str, ...]
    leaves: tuple[tuple[int, str], ...]
    sites: tuple[_Site | None, ...]
    uses: tuple[Use, ...]


def plan_walk(uses: Sequence[Use], roots: Sequence[Tensor], params: Mapping[str, Tensor]) -> WalkPlan | None:
    """How to find ``uses`` (just recorded) in a later graph of the same shape, or ``None`` if a use
    cannot be found from the graph alone."""
    graph = Graph(roots)
    names = {id(p): name for name, p in params.items()}
    leaves = tuple(
        (i, names[id(node.variable)])
        for i, node in enumerate(graph.nodes)
        if node.name() == "torch::autograd::AccumulateGrad" and id(node.variable) in names
    )
    sites = []
    for use in uses:
        node = use.output.grad_fn
        if not use.output.requires_grad or node not in graph.index:
            sites.append(None)
            continue
        if not use.plain or not _unit_scalars(node):
            return None
        other = None
        if use.other is not None:
            other = next((a for a in _saved_tensors(node) if _same_tensor(getattr(node, a), use.other)), None)
            if other is None:
                return None
        sites.append(_Site(graph.index[node], use.output.output_nr, other))
    bare = tuple(replace(u, output=None, other=None, index=None) for u in uses)
    return WalkPlan(tuple(n.name() for n in graph.nodes), leaves, tuple(sites), bare)


def walk_uses(plan: WalkPlan, roots: Sequence[Tensor], params: Mapping[str, Tensor]) -> list[Use] | None:
    """The planned uses with this evaluation's operands, and gradient edges for their outputs, or
    ``None`` if this graph is not the planned one (then the recorder runs)."""
    graph = Graph(roots)
    nodes = graph.nodes
    if len(nodes) != len(plan.names) or any(n.name() != name for n, name in zip(nodes, plan.names, strict=True)):
        return None
    if any(nodes[i].variable is not params[name] for i, name in plan.leaves):
        return None
    walked = []
    for use, site in zip(plan.uses, plan.sites, strict=True):
        if site is None:
            walked.append(use)
            continue
        node = nodes[site.node]
        if not _unit_scalars(node):
            return None
        other = None if site.other is None else getattr(node, site.other)
        walked.append(replace(use, output=GradientEdge(node, site.output_nr), other=other))
    return walked


def _saved_tensors(node) -> list[str]:
    return [a for a in dir(node) if a.startswith("_saved_") and isinstance(getattr(node, a), Tensor)]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _unit_scalars(node) -> bool:
    return all(getattr(node, a, 1) == 1 for a in _SCALARS)

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
recorded operand (same storage, offset, shape and strides). The recorded scale of a use comes from
Python scalars (``alpha`` of ``addmm``, ``W * 0.5``), which the nodes save, and the plan keeps every
number saved with a node; a use scaled by a tensor's value or built with ``exp`` (a weight
factorization) is left to the recorder, since the graph does not show that number. :func:`walk_uses`
follows the plan on a warm call: the graph is walked breadth first and accepted only if it has the
confirmed node names in the confirmed order, every parameter leaf at its place and every saved number
unchanged, and then each use takes its operand from its node. Every saved number counts, not only
those applied to parameters: a residual whose coefficient follows a schedule (``beta * u_x`` with a
changing Python ``beta``) hands over to the recorder at its first change, for good (exact, at the
recorder's cost). The forward of a network compiled with ``torch.compile`` is one node that hides
its products: there the walk does not find the planned graph either, and the recorder runs, as
before.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from torch import Tensor
from torch.autograd.graph import GradientEdge

from lightning_ntk.jacobian.gram.graph import Graph, breadth_first
from lightning_ntk.jacobian.gram.recording import Use

__all__ = ["WalkPlan", "plan_walk", "walk_uses"]


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
        names: Every node's name, in the breadth-first order of :class:`~.graph.Graph`.
        leaves: ``(position, parameter name)`` of every parameter's gradient accumulator.
        numbers: ``(position, attribute, value)`` of every number saved with a node (Python numbers
            and host scalars).
        sites: Per recorded use, where it is (``None``: no gradient reaches its output from the residuals).
        uses: The recorded uses without their tensors (what a walked use keeps of them).
    """

    names: tuple[str, ...]
    leaves: tuple[tuple[int, str], ...]
    numbers: tuple[tuple[int, str, float], ...]
    sites: tuple[_Site | None, ...]
    uses: tuple[Use, ...]


def plan_walk(uses: Sequence[Use], roots: Sequence[Tensor], params: Mapping[str, Tensor]) -> WalkPlan | None:
    """How to find ``uses`` (just recorded) in a later graph of the same shape, or ``None`` if a use
    cannot be found from the graph alone (or the graph holds what a walk cannot read, such as the
    storage-less tensors ``torch.func`` saves: the walk is only ever a shortcut for the recorder)."""
    try:
        return _plan(uses, roots, params)
    except RuntimeError:
        return None


def _plan(uses: Sequence[Use], roots: Sequence[Tensor], params: Mapping[str, Tensor]) -> WalkPlan | None:
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
        if not use.plain:
            return None
        other = None
        if use.other is not None:
            other = next((a for a in _saved_tensors(node) if _same_tensor(getattr(node, a), use.other)), None)
            if other is None:
                return None
        sites.append(_Site(graph.index[node], use.output.output_nr, other))
    numbers = tuple(
        (i, a, value)
        for i, node in enumerate(graph.nodes)
        for a in _saved(node)
        if (value := _number(getattr(node, a))) is not None and value == value  # a NaN never compares equal
    )
    bare = tuple(replace(u, output=None, other=None, index=None) for u in uses)
    return WalkPlan(tuple(n.name() for n in graph.nodes), leaves, numbers, tuple(sites), bare)


def walk_uses(plan: WalkPlan, roots: Sequence[Tensor], params: Mapping[str, Tensor]) -> list[Use] | None:
    """The planned uses with this evaluation's operands, and gradient edges for their outputs, or
    ``None`` if this graph is not the planned one (then the recorder runs)."""
    try:
        return _walk(plan, roots, params)
    except RuntimeError:
        return None


def _walk(plan: WalkPlan, roots: Sequence[Tensor], params: Mapping[str, Tensor]) -> list[Use] | None:
    nodes = breadth_first(roots)
    if len(nodes) != len(plan.names) or any(n.name() != name for n, name in zip(nodes, plan.names, strict=True)):
        return None
    if any(nodes[i].variable is not params[name] for i, name in plan.leaves):
        return None
    if any(_number(getattr(nodes[i], a)) != value for i, a, value in plan.numbers):
        return None
    walked = []
    for use, site in zip(plan.uses, plan.sites, strict=True):
        if site is None:
            walked.append(use)
            continue
        node = nodes[site.node]
        other = None if site.other is None else getattr(node, site.other)
        walked.append(_with_tensors(use, GradientEdge(node, site.output_nr), other))
    return walked


def _with_tensors(use: Use, output: GradientEdge, other: Tensor | None) -> Use:
    """``use`` with this graph's output edge and operand (``dataclasses.replace`` runs ``__init__`` again,
    several times slower, for every use of every warm call)."""
    found = object.__new__(Use)
    found.__dict__.update(use.__dict__)
    found.output, found.other = output, other
    return found


def _number(value: object) -> float | None:
    """A saved Python number, or the value of a saved host scalar (``W * 0.5`` saves ``0.5`` as a
    0-dim CPU tensor), read without a dispatched op; ``None`` for anything else."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, Tensor) and value.ndim == 0 and value.device.type == "cpu" and not value.requires_grad:
        return value.tolist()
    return None


def _saved(node) -> list[str]:
    return [a for a in dir(node) if a.startswith("_saved_")]


def _saved_tensors(node) -> list[str]:
    return [a for a in _saved(node) if isinstance(getattr(node, a), Tensor)]


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )

"""The first Gram call per module and batch signature: what every later call reuses.

Per term and output component, a plain and a seeded backward find where the points sit in each use
(:func:`~.layouts.choose_layout`) and what the use needs on every call (:func:`~.accumulation.plan_use`);
the terms whose uses do not overlap are grouped to share a backward; with several output components,
each group's backward of a component is cut where only the other components' rows lead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from lightning_ntk.jacobian.gram import cuts
from lightning_ntk.jacobian.gram.accumulation import plan_use
from lightning_ntk.jacobian.gram.cuts import Grads
from lightning_ntk.jacobian.gram.graph import Graph
from lightning_ntk.jacobian.gram.layouts import GramEntry, UseKey, UsePlan, choose_layout
from lightning_ntk.jacobian.gram.recording import GramUnsupported, Use, fingerprint

__all__ = ["UseOutputs", "confirm_uses"]


class UseOutputs:
    """Where autograd gives the gradients at the uses' outputs (the tensors, or the edges of a walk),
    once each, and each use's position."""

    def __init__(self, uses: list[Use]) -> None:
        self.tensors: list[Tensor | GradientEdge] = []
        self.slot: dict[int, int] = {}  # use index → position in tensors
        positions: dict[object, int] = {}
        for i, use in enumerate(uses):
            target = use.output
            if target is None or (isinstance(target, Tensor) and not target.requires_grad):
                continue
            key = id(target) if isinstance(target, Tensor) else (id(target.node), target.output_nr)
            j = positions.setdefault(key, len(self.tensors))
            if j == len(self.tensors):
                self.tensors.append(target)
            self.slot[i] = j


def confirm_uses(
    uses: list[Use], flat: Mapping[str, Tensor], outputs: UseOutputs, params: Mapping[str, Tensor], skip: frozenset[str]
) -> tuple[GramEntry, dict[str, list[Grads]], int]:
    """Layouts and plans of every use, term by term and component by component (two backwards each:
    plain and seeded), the groups of terms that may share a backward from now on, and, with several
    output components, where each group's backward of a component is cut (one traced backward per
    term and component)."""
    entry = GramEntry(fingerprint(uses))
    seeds = torch.Generator(device="cpu").manual_seed(0)
    terms = [t for t in flat if t not in skip]
    several = any(flat[t].shape[1] > 1 for t in terms)
    graph = Graph(list(flat.values())) if several else None
    reach: dict[str, list[set[int]]] = {}
    grads: dict[str, list[Grads]] = {}
    touched: dict[str, set[int]] = {}
    backwards = 0
    for term in terms:
        rows = flat[term]
        n = rows.shape[0]
        weights = (1 + torch.rand(n, generator=seeds, dtype=torch.float64)).to(rows)
        plans: dict[UseKey, UsePlan] = {}
        per_component: list[Grads] = []
        if graph is not None:
            reach[term] = [cuts.reached(graph, rows[:, c].sum(), outputs.tensors) for c in range(rows.shape[1])]
            backwards += rows.shape[1]
        try:
            for c in range(rows.shape[1]):
                cut = [] if graph is None else [graph.nodes[i] for i in _cut_nodes(graph, [reach[term]], c)]
                g = cuts.backward(rows[:, c].sum(), outputs.tensors, cut)
                seeded = cuts.backward((rows[:, c] * weights).sum(), outputs.tensors, cut)
                backwards += 2
                for i, j in outputs.slot.items():
                    if g[j] is not None:
                        layout = choose_layout(uses[i], g[j], seeded[j], weights, n)
                        plans[UseKey(term, c, i)] = plan_use(uses[i], layout, n, params)
                per_component.append(g)
        except GramUnsupported as err:
            entry.unsupported[term] = str(err)
            continue
        entry.plans.update(plans)
        grads[term] = per_component
        touched[term] = {key.use for key in plans}
    entry.groups = _disjoint_groups(touched)
    if graph is not None:
        for k, group in enumerate(entry.groups):
            for c in range(max(flat[t].shape[1] for t in group)):
                found = _cut_nodes(graph, [reach[t] for t in group], c)
                if found:
                    entry.cuts[(k, c)] = tuple(graph.path(i) for i in found)
    return entry, grads, backwards


def _cut_nodes(graph: Graph, reach: list[list[set[int]]], c: int) -> list[int]:
    """Where to cut the backward of component ``c`` of some terms, given what each term's components reach."""
    mine = set().union(*(r[c] for r in reach if c < len(r)))
    others = set().union(*(s for r in reach for k, s in enumerate(r) if k != c))
    return cuts.find_cuts(graph, mine, others)


def _disjoint_groups(touched: Mapping[str, set[int]]) -> list[list[str]]:
    """Terms in groups whose recorded uses do not overlap (first fit, in term order)."""
    groups: list[tuple[list[str], set[int]]] = []
    for term, mine in touched.items():
        for names, seen in groups:
            if not mine & seen:
                names.append(term)
                seen |= mine
                break
        else:
            groups.append(([term], set(mine)))
    return [names for names, _ in groups]

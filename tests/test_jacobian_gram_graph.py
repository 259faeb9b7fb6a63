"""The autograd graph walk and node paths (lightning_ntk.jacobian.gram.graph)."""

from __future__ import annotations

import torch
from conftest import StackedTwoField, two_branches, two_field_batch

from lightning_ntk.jacobian.gram.graph import Graph, NodePath, breadth_first, locate


def test_the_walk_is_breadth_first_from_the_residuals_and_knows_every_parent():
    x, a, _, r = two_branches()
    graph = Graph([r])
    assert graph.nodes[0] is r.grad_fn  # StackBackward0
    assert graph.nodes[1:3] == [r.grad_fn.next_functions[0][0], r.grad_fn.next_functions[1][0]]
    sin = a.grad_fn
    assert graph.parents[graph.index[sin]] == [1]
    assert graph.path(graph.index[sin]) == NodePath(0, ((0, "SumBackward1"), (0, "SinBackward0")))
    assert x.grad_fn is None and len(graph.nodes) == len(set(graph.nodes))


def test_locate_finds_a_node_again_in_a_new_graph_and_refuses_another_graph():
    _, _, _, r = two_branches()
    graph = Graph([r])
    i = graph.index[r.grad_fn.next_functions[0][0]]
    path = graph.path(i)
    assert path == NodePath(0, ((0, "SumBackward1"),))
    *_, again = two_branches()
    (node,) = locate([path], [again])
    assert node.name() == graph.nodes[i].name()
    wrong = NodePath(path.root, (*path.steps[:-1], (path.steps[-1][0], "TanhBackward0")))
    assert locate([wrong], [again]) is None
    assert locate([path], [again.detach()]) is None


def _levels(roots):
    """Breadth first by explicit levels (the roots' nodes, then each level's children in edge order):
    an independent reference for the order both the graph and the warm call's walk use."""
    seen, order, level = set(), [], []
    for r in roots:
        if r.grad_fn is not None and r.grad_fn not in seen:
            seen.add(r.grad_fn)
            level.append(r.grad_fn)
    while level:
        order += level
        following = []
        for node in level:
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    following.append(child)
        level = following
    return order


def test_the_node_order_is_breadth_first_by_levels_and_the_graph_knows_how_each_was_reached():
    # A warm call's walk checks node names position by position against the confirming call's Graph:
    # both must list the nodes in this order (shared nodes, several residuals, double backward).
    torch.manual_seed(0)
    residuals = StackedTwoField().double().residuals(two_field_batch())
    roots = [r.reshape(r.shape[0], -1) for r in residuals.values()]
    nodes = breadth_first(roots)
    assert nodes == _levels(roots)
    assert len(nodes) > 50 and len(set(nodes)) == len(nodes)
    graph = Graph(roots)
    assert graph.nodes == nodes
    for i, node in enumerate(nodes):
        parent, edge = graph.via[i]
        if edge >= 0:  # reached from the earliest parent that has an edge to it
            assert node is nodes[parent].next_functions[edge][0]
            assert parent == min(graph.parents[i])
    *_, r = two_branches()
    assert breadth_first([r, r]) == _levels([r, r])

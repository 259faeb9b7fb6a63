"""Cut backward passes per output component (lightning_ntk.jacobian.gram.cuts): where they stop,
that the norms stay exact, and that a gradient arriving at a cut is never silently dropped."""

from __future__ import annotations

import pytest
import torch
from conftest import StackedTwoField, assert_exact, layout_entry, mlp, two_branches, two_field_batch
from torch import nn

from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.jacobian.gram import cuts
from lightning_ntk.jacobian.gram.graph import Graph


def test_each_component_backward_stops_at_the_other_components_stack_branch():
    torch.manual_seed(0)
    model = StackedTwoField().double()
    batch = two_field_batch()
    exact_traces(model, batch)
    est = exact_traces(model, batch)
    assert set(est.info["paths"].values()) == {"gram"}
    assert_exact(est, model, batch)
    entry = layout_entry(model, batch)
    # One backward per component for both terms (group 0); each cut is the other component's row,
    # entered from the stack: edge 1 (q) for p's backward, edge 0 (p) for q's.
    assert set(entry.cuts) == {(0, 0), (0, 1)}
    for c in range(2):
        (cut,) = entry.cuts[(0, c)]
        assert cut.steps[-2:] == ((0, "StackBackward0"), (1 - c, "AddBackward0")), cut
    # The uses only the other component reaches get no gradient, so no Gram rows: 13 planned uses
    # per component of pde (measured; 20 when the backward runs the zeros through the other row).
    planned = [sum(1 for key in entry.plans if key.term == "pde" and key.component == c) for c in range(2)]
    assert planned == [13, 13]


def test_three_components_each_cut_at_both_other_rows():
    torch.manual_seed(0)
    model = StackedTwoField(components=3).double()
    batch = two_field_batch()
    exact_traces(model, batch)
    assert_exact(exact_traces(model, batch), model, batch)
    entry = layout_entry(model, batch)
    for c in range(3):
        branches = sorted(cut.steps[-1][0] for cut in entry.cuts[(0, c)])
        assert branches == [k for k in range(3) if k != c], (c, entry.cuts[(0, c)])


def test_a_cut_node_sends_no_gradient_below_it_and_says_whether_one_arrived():
    _, a, b, r = two_branches()
    graph = Graph([r])
    reach = [cuts.reached(graph, r[:, c].sum(), [a, b]) for c in range(2)]
    found = cuts.find_cuts(graph, reach[0], reach[1])
    nodes = [graph.nodes[i] for i in found]
    assert nodes == [r.grad_fn.next_functions[1][0]]  # b's row, entered from the stack
    arriving: list[torch.Tensor] = []
    g_a, g_b = cuts.backward(r[:, 0].sum(), [a, b], nodes, arriving)
    assert g_b is None
    torch.testing.assert_close(g_a, torch.ones_like(a))
    assert arriving and not bool(torch.stack(arriving).any())
    # The same cut in the backward of the other component: its own gradient arrives there.
    arriving = []
    cuts.backward(r[:, 1].sum(), [a, b], nodes, arriving)
    assert bool(torch.stack(arriving).any())


def test_the_tracer_sees_a_path_through_a_zero_weight():
    """A zero-initialized layer carries no gradient on this batch but does once trained: NaN times
    zero is NaN, so the path still counts as reached (a test for zeros would miss it)."""
    x = torch.rand(4, 2, dtype=torch.float64)
    w = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)
    z = x @ w
    h = z.tanh()
    r = torch.stack([(h @ v)[:, 0], h[:, 1]], 1)
    graph = Graph([r])
    reach = [cuts.reached(graph, r[:, c].sum(), [z]) for c in range(2)]
    assert graph.index[h.grad_fn] in reach[0]
    assert torch.autograd.grad(r[:, 0].sum(), z, retain_graph=True)[0].abs().max() == 0  # zero on this batch


class MaskedComponent(nn.Module):
    """Both rows pass through ``relu(u - shift)``: with ``shift[0]`` large, component 0 reaches
    nothing below the relu on this batch, though it does on others."""

    terms = ("pde",)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(d_in=2, width=5, d_out=2).double()
        self.shift = [100.0, -100.0]

    def residuals(self, batch):
        (x,) = batch
        v = torch.relu(self.net(x) - torch.tensor(self.shift, dtype=x.dtype))
        return {"pde": torch.stack([v[:, 0], v[:, 1] * v[:, 1]], 1)}


def test_a_component_masked_on_the_confirming_batch_is_not_cut():
    model = MaskedComponent()
    batch = (torch.rand(7, 2, dtype=torch.float64),)
    assert_exact(exact_traces(model, batch), model, batch)
    # Cut at the stack's branches only (each component's own row), nothing below the relu.
    paths = [cut.steps for found in layout_entry(model, batch).cuts.values() for cut in found]
    assert paths and all(len(steps) == 2 and steps[0][1] == "StackBackward0" for steps in paths), paths
    model.shift = [-100.0, -100.0]  # component 0 now reaches the network
    assert_exact(exact_traces(model, batch), model, batch)


def test_a_gradient_arriving_at_a_cut_makes_the_norms_nan(monkeypatch):
    """Allowed to cut below a relu (as if it were a stack), the masked component's later gradient
    arrives at the cut: the norms are NaN, never finite and short of that gradient."""
    monkeypatch.setattr(cuts, "SPLITTING", cuts.SPLITTING | {"ReluBackward0"})
    model = MaskedComponent()
    batch = (torch.rand(7, 2, dtype=torch.float64),)
    assert_exact(exact_traces(model, batch), model, batch)
    paths = [cut.steps for found in layout_entry(model, batch).cuts.values() for cut in found]
    assert any("ReluBackward0" in (name for _, name in steps) for steps in paths), paths  # below the relu
    model.shift = [-100.0, -100.0]
    est = exact_traces(model, batch)
    assert torch.isnan(est.traces["pde"])


class Sign(StackedTwoField):
    """The pde rows with ``+`` or ``-`` before the cubic part: the same parameter uses, another graph."""

    minus = False

    def residuals(self, batch):
        out = super().residuals(batch)
        if self.minus:
            out["pde"] = torch.stack([-row for row in out["pde"].unbind(1)], 1)
        return out


def test_a_graph_whose_cut_path_changed_is_confirmed_again():
    torch.manual_seed(0)
    model = Sign().double()
    batch = two_field_batch()
    exact_traces(model, batch)
    first = layout_entry(model, batch)
    model.minus = True
    est = exact_traces(model, batch)
    assert layout_entry(model, batch) is not first
    assert_exact(est, model, batch)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_new_batch_of_the_same_layout_keeps_the_cuts_and_stays_exact(seed):
    torch.manual_seed(0)
    model = StackedTwoField().double()
    exact_traces(model, two_field_batch(seed=0))
    entry = layout_entry(model, two_field_batch())
    batch = two_field_batch(seed=seed + 1)
    est = exact_traces(model, batch)
    assert layout_entry(model, batch) is entry
    assert_exact(est, model, batch)

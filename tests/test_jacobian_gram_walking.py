"""Warm calls that find the parameter uses by walking the autograd graph instead of recording
(lightning_ntk.jacobian.gram.walking): the same operands and gradients as the recorder, and the
recorder again wherever the graph or a number applied to a parameter could differ."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import (
    AutogradPoisson,
    StackedTwoField,
    assert_exact,
    layout_entry,
    poisson_batch,
    reference_traces,
    two_field_batch,
)
from torch import nn

import lightning_ntk.jacobian.gram as gram
from lightning_ntk.contract import trainable_parameters
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.jacobian.gram import walking
from lightning_ntk.jacobian.gram.recording import record_uses


class Recordings:
    """Counts the recorder's evaluations (the Gram path's ``record_uses``)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = gram.record_uses

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(gram, "record_uses", counted)


def test_a_warm_call_walks_the_graph_instead_of_recording(monkeypatch):
    recordings = Recordings(monkeypatch)
    model = AutogradPoisson(width=8).double()
    batch = poisson_batch(n_r=12)
    exact_traces(model, batch)
    assert recordings.calls == 1 and layout_entry(model, batch).walk is not None
    for seed in range(3):
        batch = poisson_batch(n_r=12, seed=seed)
        assert_exact(exact_traces(model, batch), model, batch)
    assert recordings.calls == 1


def test_the_walk_finds_the_recorders_operands_and_gradients():
    torch.manual_seed(0)
    model = StackedTwoField().double()
    batch = two_field_batch()
    params = trainable_parameters(model)
    residuals, recorded = record_uses(params, model.residuals, batch)
    roots = [r.reshape(r.shape[0], -1) for r in residuals.values()]
    plan = walking.plan_walk(recorded, roots, params)
    assert plan is not None
    again = model.residuals(batch)
    walked = walking.walk_uses(plan, [r.reshape(r.shape[0], -1) for r in again.values()], params)
    assert walked is not None and len(walked) == len(recorded) == len(plan.sites)
    for old, new in zip(recorded, walked, strict=True):
        assert (old.name, old.kind, old.scale) == (new.name, new.kind, new.scale)
        assert (old.other is None) == (new.other is None)
        if old.other is not None:
            assert torch.equal(old.other, new.other)
    reached = [(old.output, new.output) for old, new in zip(recorded, walked, strict=True) if new.output is not None]
    assert len(reached) > 10
    total = sum(r.sum() for r in residuals.values())
    total_again = sum(r.sum() for r in again.values())
    want = torch.autograd.grad(total, [o for o, _ in reached], allow_unused=True)
    got = torch.autograd.grad(total_again, [e for _, e in reached], allow_unused=True)
    for a, b in zip(want, got, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)


class ScaledWeight(nn.Module):
    """A weight scaled by a number read during the evaluation: the graph does not show the number."""

    terms = ("bc", "pde")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(1, 6).double()
        self.outer = nn.Linear(6, 1).double()
        self.scale = torch.tensor(1.0, dtype=torch.float64)

    def net(self, x):
        return F.linear(torch.tanh(self.inner(x)), self.outer.weight * self.scale, self.outer.bias)

    def residuals(self, batch):
        x_b, x_r = batch
        return {"bc": self.net(x_b), "pde": self.net(x_r) - torch.sin(x_r)}


def test_a_use_scaled_by_a_number_is_never_walked():
    model = ScaledWeight()
    batch = poisson_batch(n_r=7)
    assert_exact(exact_traces(model, batch), model, batch)
    assert layout_entry(model, batch).walk is None
    model.scale = torch.tensor(3.0, dtype=torch.float64)
    assert_exact(exact_traces(model, batch), model, batch)


class Temperature(ScaledWeight):
    """The output weight scaled by a Python number (saved with its graph node) that a schedule changes."""

    def __init__(self):
        super().__init__()
        self.temperature = 1.0

    def net(self, x):
        return F.linear(torch.tanh(self.inner(x)), self.outer.weight * self.temperature, self.outer.bias)


def test_a_weight_scaled_by_a_changed_python_number_hands_over_to_the_recorder():
    model = Temperature()
    batch = poisson_batch(n_r=7)
    exact_traces(model, batch)
    entry = layout_entry(model, batch)
    assert entry.walk is not None  # the number is saved with the node: the walk can check it
    assert_exact(exact_traces(model, batch), model, batch)
    assert entry.walk is not None
    model.temperature = 0.25
    assert_exact(exact_traces(model, batch), model, batch)
    assert entry.walk is None


class Alpha(AutogradPoisson):
    """``addmm`` with an ``alpha`` that changes between calls: saved with the node, so a walk sees it."""

    alpha = 1.0

    def residuals(self, batch):
        out = super().residuals(batch)
        x_b, _ = batch
        last = self.net[-1]
        hidden = self.net[:-1](x_b)
        out["bc"] = torch.addmm(last.bias, hidden, last.weight.t(), alpha=self.alpha)
        return out


def test_a_walk_that_meets_another_scalar_hands_over_to_the_recorder(monkeypatch):
    recordings = Recordings(monkeypatch)
    torch.manual_seed(0)
    model = Alpha(width=6).double()
    batch = poisson_batch(n_r=7)
    exact_traces(model, batch)
    entry = layout_entry(model, batch)
    assert entry.walk is not None
    model.alpha = 2.5
    assert_exact(exact_traces(model, batch), model, batch)
    assert layout_entry(model, batch) is entry and entry.walk is None  # the recorder from now on
    assert recordings.calls == 2
    assert_exact(exact_traces(model, batch), model, batch)
    assert recordings.calls == 3


class Identity(AutogradPoisson):
    """The pde residual with or without an extra factor of one: the same uses, one node more."""

    extra = False

    def residuals(self, batch):
        out = super().residuals(batch)
        if self.extra:
            out["pde"] = out["pde"] * 1.0
        return out


def test_a_graph_with_other_nodes_is_recorded_again():
    torch.manual_seed(0)
    model = Identity(width=6).double()
    batch = poisson_batch(n_r=7)
    exact_traces(model, batch)
    model.extra = True
    assert_exact(exact_traces(model, batch), model, batch)
    assert layout_entry(model, batch).walk is None


class Leaf(AutogradPoisson):
    """The output layer's weight, or a tensor that needs a gradient but is not a parameter."""

    use_leaf = False

    def __init__(self, width: int):
        super().__init__(width=width)
        self.leaf = torch.randn(1, width, dtype=torch.float64, requires_grad=True)

    def residuals(self, batch):
        x_b, x_r = batch
        last = self.net[-1]
        weight = self.leaf if self.use_leaf else last.weight
        x_r = x_r.requires_grad_(True)
        u = F.linear(self.net[:-1](x_r), weight, last.bias)
        u_x = torch.autograd.grad(u.sum(), x_r, create_graph=True)[0]
        u_xx = torch.autograd.grad(u_x.sum(), x_r, create_graph=True)[0]
        return {"bc": F.linear(self.net[:-1](x_b), weight, last.bias), "pde": u_xx}


def test_a_walk_whose_leaf_is_not_the_planned_parameter_hands_over_to_the_recorder():
    torch.manual_seed(0)
    model = Leaf(width=6).double()
    batch = poisson_batch(n_r=7)
    exact_traces(model, batch)
    assert layout_entry(model, batch).walk is not None
    model.use_leaf = True  # same graph, but the weight is not a parameter: none of its uses count
    assert_exact(exact_traces(model, batch), model, batch)


class Fit(nn.Module):
    """Two data terms, for a network compiled with ``torch.compile``."""

    terms = ("a", "b")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def residuals(self, batch):
        x_a, x_b = batch
        return {"a": self.net(x_a) - 1.0, "b": self.net(x_b)}


def test_a_compiled_network_stays_exact_on_warm_calls(monkeypatch):
    # Where the compiled forward runs (one node hiding its products) the walk hands over to the
    # recorder; either way every warm trace is exact and at most one more recording is made.
    recordings = Recordings(monkeypatch)
    model = Fit()
    batch = poisson_batch(n_r=7)
    want = reference_traces(model, batch)
    model.net = torch.compile(model.net, backend="aot_eager")
    for _ in range(3):
        est = exact_traces(model, batch)
        for name in want:
            torch.testing.assert_close(est.traces[name], want[name], rtol=1e-10, atol=0)
    assert recordings.calls <= 2

"""What exact traces cost, counted (never timed): backward passes, aten ops, host synchronisations.

A cache keyed wrong keeps every number right and doubles the cost (design.md §4, mistake 11), so
these are tested like numbers. The budgets were measured on torch 2.13 (CPU); the figure measured is
written beside each.
"""

from __future__ import annotations

import torch
from conftest import AutogradPoisson, TwoFieldModel, poisson_batch

from lightning_ntk.counting import BackwardCounter, OpCounter
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.memory import memory_of
from lightning_ntk.points import batch_signature


def warm_call(model, batch):
    """Counts of the second exact call on the same module and batch layout."""
    exact_traces(model, batch)
    with OpCounter() as ops, BackwardCounter("lightning_ntk") as backwards:
        est = exact_traces(model, batch)
    return est, ops, backwards.calls


def test_the_second_call_finds_its_layouts_and_runs_only_the_backwards_it_needs():
    model = AutogradPoisson(width=8).double()
    batch = poisson_batch(n_r=12)
    with BackwardCounter("lightning_ntk") as first:
        exact_traces(model, batch)
    entries = memory_of(model).exact
    assert list(entries) == [batch_signature(batch)]
    confirmed = entries[batch_signature(batch)].layouts
    assert confirmed is not None and entries[batch_signature(batch)].checked
    est, _, backwards = warm_call(model, batch)
    assert list(entries) == [batch_signature(batch)]
    assert entries[batch_signature(batch)].layouts is confirmed
    assert set(est.info["paths"].values()) == {"gram"}
    # Two scalar terms on their own points: one backward of the sum of both terms' rows; the first
    # call also ran a plain and a seeded backward per term and the cross-check's per-point backwards.
    assert backwards == 1
    assert first.calls > backwards


def test_a_new_batch_of_the_same_layout_reuses_the_layouts():
    model = AutogradPoisson(width=8).double()
    exact_traces(model, poisson_batch(n_r=12, seed=0))
    confirmed = memory_of(model).exact[batch_signature(poisson_batch(n_r=12))].layouts
    _, ops, backwards = warm_call(model, poisson_batch(n_r=12, seed=1))
    assert memory_of(model).exact[batch_signature(poisson_batch(n_r=12))].layouts is confirmed
    assert backwards == 1
    assert ops.syncs == 0


def test_warm_exact_calls_read_nothing_on_the_host():
    for model, batch in [
        (AutogradPoisson(width=8).double(), poisson_batch(n_r=12)),
        (TwoFieldModel().double(), (torch.rand(5, 2, dtype=torch.float64), torch.rand(9, 2, dtype=torch.float64))),
    ]:
        _, ops, _ = warm_call(model, batch)
        assert ops.syncs == 0, {op: n for op, n in ops.ops.items() if n and op in ("_local_scalar_dense", "equal")}

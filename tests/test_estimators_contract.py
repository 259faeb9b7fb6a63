"""The contract every registered estimator keeps, parametrized over the registry itself.

A new estimator file that registers itself is tested here without touching this file.
"""

import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, TwoFieldModel, poisson_batch

from lightning_ntk import estimate_ntk_traces
from lightning_ntk.estimators import ESTIMATORS, TraceEstimate

NAMES = sorted(ESTIMATORS)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cls", [HelperPoisson, AutogradPoisson])
def test_estimate_shape_rows_and_no_graph(name, cls):
    model = cls().double()
    batch = poisson_batch(n_r=9)
    est = estimate_ntk_traces(model, batch, name, generator=seeded())
    assert isinstance(est, TraceEstimate) and est.estimator == name
    assert list(est.traces) == list(model.terms) and list(est.stderr) == list(model.terms)
    assert est.num_rows == {"bc": 2, "pde": 9}
    for term in model.terms:
        trace, stderr = est.traces[term], est.stderr[term]
        assert trace.ndim == 0 and not trace.requires_grad and trace.dtype == torch.float64
        assert torch.isfinite(trace) and trace > 0
        assert stderr.ndim == 0 and not stderr.requires_grad and not stderr < 0


@pytest.mark.parametrize("name", NAMES)
def test_vector_valued_rows_count_every_entry(name):
    model = TwoFieldModel().double()
    g = seeded(1)
    batch = (torch.rand(4, 2, generator=g, dtype=torch.float64), torch.rand(7, 2, generator=g, dtype=torch.float64))
    assert estimate_ntk_traces(model, batch, name, generator=seeded()).num_rows == {"data": 8, "pde": 14}


@pytest.mark.parametrize("name", NAMES)
def test_leaves_parameters_grads_and_mode_alone(name):
    model = HelperPoisson().double().eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)
    before = [p.detach().clone() for p in model.parameters()]
    estimate_ntk_traces(model, poisson_batch(), name, generator=seeded())
    assert not model.training
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p) and torch.equal(p.grad, torch.full_like(p, 5.0))


@pytest.mark.parametrize("name", NAMES)
def test_a_seeded_generator_reproduces_the_estimate(name):
    model = HelperPoisson().double()
    a = estimate_ntk_traces(model, poisson_batch(), name, generator=seeded(3))
    b = estimate_ntk_traces(model, poisson_batch(), name, generator=seeded(3))
    assert all(torch.equal(a.traces[t], b.traces[t]) for t in a.traces)

"""The contract every registered estimator keeps, parametrized over the registry itself.

A new estimator file that registers itself is tested here without touching this file.
"""

import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, TwoFieldModel, poisson_batch

from lightning_ntk import estimate_ntk_traces
from lightning_ntk.estimators import (
    ESTIMATORS,
    Exact,
    FiniteDifference,
    Hutchinson,
    Subsample,
    TraceEstimate,
    TraceEstimator,
    as_estimator,
    register_estimator,
)
from lightning_ntk.memory import forget

NAMES = sorted(ESTIMATORS)  # collected before any test registers its own


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


@pytest.mark.parametrize("name", NAMES)
def test_the_name_stands_for_an_object_with_the_estimators_defaults(name):
    model = HelperPoisson().double()
    estimator = as_estimator(name)
    assert isinstance(estimator, TraceEstimator) and estimator.name == name
    a = estimator(model, poisson_batch(), seeded(3))
    b = estimate_ntk_traces(model, poisson_batch(), name, generator=seeded(3))
    assert a.estimator == name and all(torch.equal(a.traces[t], b.traces[t]) for t in b.traces)
    assert type(estimator) is ESTIMATORS[name]


def test_options_of_an_object_reach_the_estimator():
    model = HelperPoisson().double()
    batch = poisson_batch(n_r=30)
    for made, name, options in [
        (Hutchinson(num_probes=3), "hutchinson", {"num_probes": 3}),
        (FiniteDifference(num_probes=2, points_per_probe=7), "fd", {"num_probes": 2, "points_per_probe": 7}),
        (Subsample(num_points=5), "subsample", {"num_points": 5}),
    ]:
        forget()  # every call starts from the same (empty) memory of the module
        a = made(model, batch, seeded(1))
        forget()
        b = estimate_ntk_traces(model, batch, name, generator=seeded(1), **options)
        forget()
        c = estimate_ntk_traces(model, batch, name, generator=seeded(1))
        assert all(torch.equal(a.traces[t], b.traces[t]) for t in b.traces)
        assert not all(torch.equal(a.traces[t], c.traces[t]) for t in c.traces)  # the options matter here
    assert Exact(paths=["gram"])(model, batch).info["paths"] == {"bc": "gram", "pde": "gram"}


def test_a_registered_function_without_a_class_is_wrapped_by_name():
    @register_estimator("constant_for_test")
    def constant(module, batch, *, generator=None, value=2.0):
        traces = {t: torch.tensor(value) for t in module.terms}
        return TraceEstimate(
            traces, {t: torch.tensor(0.0) for t in traces}, dict.fromkeys(traces, 1), "constant_for_test"
        )

    try:
        wrapped = as_estimator("constant_for_test")
        assert isinstance(wrapped, TraceEstimator) and repr(wrapped) == "as_estimator('constant_for_test')"
        estimate = as_estimator("constant_for_test", value=3.0)(HelperPoisson().double(), poisson_batch())
        assert estimate.traces["bc"] == 3.0
        with pytest.raises(ValueError, match=r"does not take option\(s\) \['valu'\]; it takes \['value'\]"):
            as_estimator("constant_for_test", valu=3.0)
    finally:
        del ESTIMATORS["constant_for_test"]

"""ntk_traces hygiene: gradients, frozen/unused/tied parameters, module mode."""

import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, poisson_batch, reference_traces
from torch import nn

from lightning_ntk import Exact, ntk_traces
from lightning_ntk.derivatives import partial


def test_param_grad_untouched():
    # Guards against mistake 4: gradients of the weight computation leaking into the training step.
    model = HelperPoisson().double()
    batch = poisson_batch()
    ntk_traces(model, batch)
    assert all(p.grad is None for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    ntk_traces(model, batch)
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_result_has_no_graph_and_mode_is_unchanged():
    model = HelperPoisson().double()
    for training in (True, False):
        model.train(training)
        traces = ntk_traces(model, poisson_batch())
        assert model.training is training
        assert all(not t.requires_grad for t in traces.values())


def test_frozen_parameters_are_excluded():
    # Guards against mistake 6: frozen parameters crashing (or silently counting in) the Jacobian.
    model = HelperPoisson().double()
    batch = poisson_batch()
    full = ntk_traces(model, batch)
    model.net[0].requires_grad_(False)
    got = ntk_traces(model, batch)
    want = reference_traces(model, batch, [p for p in model.parameters() if p.requires_grad])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)
    assert all(got[name] < full[name] for name in full)


class WithUnused(HelperPoisson):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(4, 4).double()  # registered, never used
        self.head = nn.Linear(1, 1).double()  # used by the bc term only

    def residuals(self, batch):
        x_b, x_r = batch
        return {"bc": self.head(self.net(x_b)), "pde": partial(self.net, x_r, 0, 0)}


def test_unused_parameters_contribute_zero():
    # Guards against mistake 6: unused parameters (and a module used by one term only) crashing.
    model = WithUnused().double()
    batch = poisson_batch()
    got = ntk_traces(model, batch)
    want = reference_traces(model, batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)


def test_tied_parameters_count_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2, bias=False).double()
            self.b = nn.Linear(2, 2, bias=False).double()
            self.b.weight = self.a.weight

        def residuals(self, x):
            return {"fit": self.b(torch.tanh(self.a(x))).sum(-1)}

    model = Tied()
    x = torch.randn(5, 2, dtype=torch.float64)
    want = reference_traces(model, x)
    torch.testing.assert_close(ntk_traces(model, x)["fit"], want["fit"], rtol=1e-10, atol=0)


def test_no_trainable_parameters_is_a_clear_error():
    model = HelperPoisson().requires_grad_(False)
    with pytest.raises(ValueError, match=r"does not depend on any trainable parameter|no trainable parameters"):
        ntk_traces(model, poisson_batch(dtype=torch.float32))


def test_module_without_residuals():
    with pytest.raises(TypeError, match="no `residuals"):
        ntk_traces(nn.Linear(1, 1), torch.zeros(2, 1))


def test_inference_mode_is_refused_clearly():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        ntk_traces(HelperPoisson(), poisson_batch(dtype=torch.float32))


def test_works_under_no_grad():
    model = HelperPoisson().double()
    batch = poisson_batch()
    with torch.no_grad():
        got = ntk_traces(model, batch)
    want = ntk_traces(model, batch)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=0)


def test_an_option_the_chosen_estimator_does_not_take_names_that_estimator():
    model = HelperPoisson().double()
    match = r"Estimator 'fd' \(FiniteDifference\) does not take option\(s\) \['num_probe'\]; it takes \[.*'num_probes'"
    with pytest.raises(ValueError, match=match):
        ntk_traces(model, poisson_batch(), "fd", num_probe=4)
    with pytest.raises(ValueError, match=r"Estimator 'exact' \(Exact\) does not take option\(s\) \['num_probes'\]"):
        ntk_traces(model, poisson_batch(), num_probes=4)


def test_an_estimator_object_is_accepted_and_takes_no_extra_options():
    model = HelperPoisson().double()
    batch = poisson_batch()
    assert ntk_traces(model, batch, Exact()) == ntk_traces(model, batch, "exact")
    with pytest.raises(ValueError, match="constructor"):
        ntk_traces(model, batch, Exact(), chunk_size=3)


def test_a_batch_of_another_dtype_is_a_clear_error_naming_both_dtypes():
    model = AutogradPoisson().double()
    for estimator in ("exact", "fd"):
        with pytest.raises(TypeError, match=r"is torch.float32, but the module's parameters are torch.float64"):
            ntk_traces(model, poisson_batch(dtype=torch.float32), estimator)


def test_a_residual_that_casts_its_inputs_may_take_another_dtype():
    class Casting(HelperPoisson):
        def residuals(self, batch):
            return super().residuals(tuple(t.to(torch.float64) for t in batch))

    model = Casting().double()
    single = poisson_batch(dtype=torch.float32)
    assert ntk_traces(model, single) == ntk_traces(model, tuple(t.double() for t in single))

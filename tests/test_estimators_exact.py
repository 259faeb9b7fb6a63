import warnings

import pytest
import torch
from conftest import (
    AutogradPoisson,
    FuncPoisson,
    HelperPoisson,
    TwoFieldModel,
    poisson_batch,
    reference_traces,
)
from torch import nn

from lightning_ntk import estimate_ntk_traces, ntk_traces
from lightning_ntk.estimators.exact import exact_traces

RTOL = 1e-10


def assert_traces_close(got, want, rtol=RTOL):
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=0.0, msg=f"term {name}")


@pytest.mark.parametrize("cls", [HelperPoisson, FuncPoisson, AutogradPoisson])
def test_exact_equals_per_point_loop_float64(cls):
    model = cls().double()
    batch = poisson_batch(n_r=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ntk_traces(model, batch)
    ref_model = AutogradPoisson().double()
    ref_model.load_state_dict(model.state_dict())
    want = reference_traces(ref_model, poisson_batch(n_r=12))
    assert_traces_close(got, want)
    assert got["pde"] > 0 and got["bc"] > 0


@pytest.mark.parametrize("model_cls", [HelperPoisson, FuncPoisson, AutogradPoisson])
def test_every_residual_style_takes_the_gram_path_first(model_cls):
    est = exact_traces(model_cls().double(), poisson_batch())
    assert est.info["paths"] == {"bc": "gram", "pde": "gram"}


def test_without_gram_helpers_take_vmap_and_autograd_style_the_loop():
    batch = poisson_batch()
    per_point = ("vmap", "loop", "rows")
    assert exact_traces(HelperPoisson().double(), batch, paths=per_point).info["paths"] == {"bc": "vmap", "pde": "vmap"}
    assert exact_traces(FuncPoisson().double(), batch, paths=per_point).info["paths"] == {"bc": "vmap", "pde": "vmap"}
    with pytest.warns(UserWarning, match="'loop' path"):
        est = exact_traces(AutogradPoisson().double(), poisson_batch(seed=3), paths=per_point)
    assert est.info["paths"] == {"bc": "loop", "pde": "loop"}


def test_vector_valued_residuals():
    model = TwoFieldModel().double()
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.rand(5, 2, generator=g, dtype=torch.float64),
        torch.rand(9, 2, generator=g, dtype=torch.float64),
    )
    est = estimate_ntk_traces(model, batch)
    assert est.num_rows == {"data": 10, "pde": 18}
    assert_traces_close(est.traces, reference_traces(model, batch))


def test_same_point_count_terms_share_one_vmap_and_stay_exact():
    # bc and pde both have 12 points: one joint split of the batch serves both terms.
    model = HelperPoisson().double()
    g = torch.Generator().manual_seed(2)
    batch = (
        torch.rand(12, 1, generator=g, dtype=torch.float64),
        torch.rand(12, 1, generator=g, dtype=torch.float64),
    )
    want = reference_traces(model, batch)
    for path in ("gram", "vmap"):
        est = exact_traces(model, batch, paths=(path,))
        assert est.info["paths"] == {"bc": path, "pde": path}
        assert_traces_close(est.traces, want)


class NonPointwise(HelperPoisson):
    """Rows depend on the whole batch (mean-centred), so per-point evaluation is invalid."""

    def residuals(self, batch):
        out = super().residuals(batch)
        pde = out["pde"]
        return {"bc": out["bc"], "pde": pde - pde.mean()}


def test_non_pointwise_residual_falls_back_to_rows_and_stays_exact():
    model = NonPointwise().double()
    batch = poisson_batch(n_r=7)
    with pytest.warns(UserWarning, match="'rows' path"):
        est = exact_traces(model, batch)
    assert est.info["paths"]["pde"] == "rows"
    assert_traces_close(est.traces, reference_traces(model, batch))


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    # chunk_size only affects the vmap path (the Gram path has no chunks): compare it with the
    # hand-built Jacobian at every chunk size.
    model = HelperPoisson().double()
    batch = poisson_batch(n_r=10)
    est = exact_traces(model, batch, chunk_size=chunk_size, paths=("vmap",))
    assert est.info["paths"] == {"bc": "vmap", "pde": "vmap"}
    assert_traces_close(est.traces, reference_traces(model, batch))


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_chunk_size(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        ntk_traces(HelperPoisson(), poisson_batch(dtype=torch.float32), chunk_size=bad)


def test_linear_model_closed_form():
    # r_n = w·x_n + b on one parameter vector: ‖∂r_n/∂θ‖² = ‖x_n‖² + 1.
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1).double()

        def residuals(self, x):
            return {"fit": self.lin(x)}

    x = torch.randn(6, 3, dtype=torch.float64)
    got = ntk_traces(Linear(), x)["fit"]
    torch.testing.assert_close(got, (x.square().sum(1) + 1).sum(), rtol=1e-12, atol=0)


def test_unknown_estimator():
    with pytest.raises(ValueError, match="Unknown NTK trace estimator 'magic'"):
        ntk_traces(HelperPoisson(), poisson_batch(dtype=torch.float32), estimator="magic")


def test_trace_is_not_a_gradient_norm_of_the_loss():
    # Guards against mistake 1: using ‖∇θ L_i‖ (or ‖∇θ Σ_n r_n‖) instead of Tr K_ii = Σ_n ‖∇θ r_n‖².
    # "Square then sum" differs from "sum then square": the proxies are far from the trace here.
    model = HelperPoisson().double()
    batch = poisson_batch(n_r=12)
    trace = ntk_traces(model, batch)["pde"]
    r = model.residuals(batch)["pde"]
    params = list(model.parameters())
    loss_grad = torch.autograd.grad(r.square().mean(), params, retain_graph=True, allow_unused=True)
    sum_grad = torch.autograd.grad(r.sum(), params, allow_unused=True)
    for proxy in (loss_grad, sum_grad):
        value = sum(g.square().sum() for g in proxy if g is not None)
        assert abs(float(value) / float(trace) - 1) > 0.1
    torch.testing.assert_close(trace, reference_traces(model, batch)["pde"], rtol=1e-10, atol=0)


def test_residual_block_uses_the_operator_not_the_raw_output():
    # Guards against mistake 10: building the residual block's Jacobian from the raw network output
    # u(x_r) instead of the operator N[u](x_r) = u_xx(x_r).
    model = HelperPoisson().double()
    x_b, x_r = poisson_batch(n_r=12)
    operator = ntk_traces(model, (x_b, x_r))["pde"]
    params = list(model.parameters())
    raw_trace = sum(
        sum(
            g.square().sum()
            for g in torch.autograd.grad(model.net(x_r[n : n + 1]).sum(), params, allow_unused=True)
            if g is not None
        )
        for n in range(x_r.shape[0])
    )
    assert abs(float(operator) / float(raw_trace) - 1) > 0.1
    torch.testing.assert_close(operator, reference_traces(model, (x_b, x_r))["pde"], rtol=1e-10, atol=0)

"""TaylorMLP: its streams equal autograd derivatives, and its exact traces take the Gram path."""

import pytest
import torch
from conftest import bc_res_batch as make_batch
from conftest import reference_point_norms, reference_traces
from torch import nn

from lightning_ntk.derivatives import partial
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.jacobian import per_point_squared_norms
from lightning_ntk.taylor import ACTIVATIONS, TaylorMLP


def residual_poisson(net, b):
    return {"bc": net(b["bc"]), "pde": net.taylor(b["res"], second=[0])[0, 0] + 1.0}


def residual_laplace(net, b):
    d = net.taylor(b["res"], second=[0, 1])
    return {"bc": net(b["bc"]) - 1.0, "pde": d[0, 0] + d[1, 1]}


def residual_heat(net, b):
    d = net.taylor(b["res"], first=[1], second=[0])
    return {"ic": net(b["bc"]), "pde": d[1] - 0.1 * d[0, 0]}


def residual_wave(net, b):
    d = net.taylor(b["res"], second=[0, 1])
    return {"ic": net.taylor(b["bc"], first=[1])[1], "pde": d[1, 1] - 4 * d[0, 0]}


def residual_allen_cahn(net, b):
    d = net.taylor(b["res"], first=[1], second=[0])
    u = d["u"]
    return {"bc": net(b["bc"]), "pde": d[1] - 1e-2 * d[0, 0] + 5 * u**3 - 5 * u}


def residual_neumann_mixed(net, b):
    d = net.taylor(b["res"], mixed=[(0, 1)], second=[0])
    return {"neumann": net.taylor(b["bc"], first=[0])[0], "pde": d[0, 1] + d[0, 0]}


PROBLEMS = {
    "poisson_1d": (1, 1, residual_poisson),
    "laplace_2d": (2, 1, residual_laplace),
    "heat": (2, 1, residual_heat),
    "wave": (2, 1, residual_wave),
    "allen_cahn": (2, 1, residual_allen_cahn),
    "two_field": (2, 2, residual_heat),
    "neumann_mixed": (2, 1, residual_neumann_mixed),
}


class Problem(nn.Module):
    def __init__(self, d_in, d_out, fn, activation="tanh", fourier=None):
        super().__init__()
        self.net = TaylorMLP(d_in, 6, 2, d_out=d_out, activation=activation, fourier_features=fourier).double()
        self.fn = fn

    def residuals(self, batch):
        return self.fn(self.net, batch)


def assert_exact(model, batch):
    got = per_point_squared_norms(model, batch)
    assert set(got.paths.values()) == {"gram"}
    want = reference_point_norms(model, batch)
    via_func = per_point_squared_norms(model, batch, paths=("vmap",))
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0, msg=name)
        torch.testing.assert_close(got.norms[name], via_func.norms[name], rtol=1e-10, atol=0, msg=name)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_gram_norms_equal_per_point_loop_and_torch_func(problem):
    d_in, d_out, fn = PROBLEMS[problem]
    torch.manual_seed(0)
    assert_exact(Problem(d_in, d_out, fn), make_batch(d_in))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("fourier", [None, (3, 1.0)])
def test_every_activation_with_and_without_fourier_features(activation, fourier):
    torch.manual_seed(1)
    assert_exact(Problem(2, 1, residual_allen_cahn, activation, fourier), make_batch(2, seed=1))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_streams_equal_autograd_derivatives(activation):
    torch.manual_seed(2)
    net = TaylorMLP(2, 5, 2, activation=activation, fourier_features=(3, 1.0)).double()
    x = torch.rand(6, 2, dtype=torch.float64)
    d = net.taylor(x, first=[0, 1], second=[0, 1], mixed=[(0, 1)])
    for key, dims in ((0, (0,)), (1, (1,)), ((0, 0), (0, 0)), ((1, 1), (1, 1)), ((0, 1), (0, 1))):
        torch.testing.assert_close(d[key], partial(net, x, *dims), rtol=1e-10, atol=1e-12)


class NotPointwise(Problem):
    def residuals(self, batch):
        out = super().residuals(batch)
        return {"ic": out["ic"], "pde": out["pde"] - out["pde"].mean()}


def test_non_pointwise_residual_falls_back_and_stays_exact():
    torch.manual_seed(3)
    model = NotPointwise(2, 1, residual_heat)
    batch = make_batch(2, seed=3)
    with pytest.warns(UserWarning, match="'rows' path"):
        est = exact_traces(model, batch)
    assert est.info["paths"]["pde"] == "rows"
    want = reference_traces(model, batch)
    for name in want:
        torch.testing.assert_close(est.traces[name], want[name], rtol=1e-10, atol=0)


def test_a_coefficient_outside_the_mlp_stays_on_the_gram_path():
    class WithCoefficient(Problem):
        def __init__(self):
            super().__init__(2, 1, residual_heat)
            self.k = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))  # an inverse-problem unknown

        def residuals(self, batch):
            out = super().residuals(batch)
            return {"ic": out["ic"], "pde": out["pde"] * self.k}

    model = WithCoefficient()
    batch = make_batch(2)
    assert_exact(model, batch)


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unknown activation"):
        TaylorMLP(1, 4, 1, activation="relu")
    net = TaylorMLP(2, 4, 1)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        net.taylor(torch.rand(3, 1))
    with pytest.raises(ValueError, match="out of range"):
        net.taylor(torch.rand(3, 2), first=[2])


def test_taylor_mlp_differentiated_by_torch_func_is_exact_too():
    # Differentiating the TaylorMLP with torch.func instead of its streams records other uses of the
    # same weights; the Gram path covers both.
    class ViaPartial(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TaylorMLP(1, 5, 2).double()

        def residuals(self, batch):
            return {"pde": partial(self.net, batch, 0, 0)}

    torch.manual_seed(4)
    model = ViaPartial()
    x = torch.rand(6, 1, dtype=torch.float64)
    assert_exact(model, x)

"""The Gram path (lightning_ntk.jacobian.gram): per-point norms equal a hand-built Jacobian, or it steps aside.

Every case compares per-point norms with an independent per-row autograd loop on the full batch
(float64, rtol 1e-10). Networks × residual styles cover what PINN users write; the fallback cases
use a parameter in a way the identities do not model and must still give the loop's values.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import bc_res_batch as make_batch
from conftest import reference_point_norms
from torch import nn
from torch.func import hessian, jacfwd, vmap

from lightning_ntk.derivatives import laplacian, partial
from lightning_ntk.jacobian import per_point_squared_norms
from lightning_ntk.jacobian.gram import gram_squared_norms
from lightning_ntk.taylor import TaylorMLP


class Sine(nn.Module):
    def forward(self, x):
        return torch.sin(x)


class AdaptiveTanh(nn.Module):
    """Jagtap-style adaptive activation: tanh(n·a·x) with a trainable slope a."""

    def __init__(self, n: float = 10.0):
        super().__init__()
        self.n = n
        self.a = nn.Parameter(torch.full((1,), 1.0 / n))

    def forward(self, x):
        return torch.tanh(self.n * self.a * x)


def sequential(d_in, d_out, activation=nn.Tanh, width=6):
    return nn.Sequential(
        nn.Linear(d_in, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, d_out)
    )


class Skip(nn.Module):
    """Residual (skip) connections between hidden layers."""

    def __init__(self, d_in, d_out, width=6):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for layer in self.hidden:
            h = h + torch.tanh(layer(h))
        return self.out(h)


class ModifiedMLP(nn.Module):
    """JAX-PI's modified MLP: gates U, V from the input, h ← (1 − z)⊙U + z⊙V."""

    def __init__(self, d_in, d_out, width=6):
        super().__init__()
        self.u, self.v, self.inp = nn.Linear(d_in, width), nn.Linear(d_in, width), nn.Linear(d_in, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        u, v = torch.tanh(self.u(x)), torch.tanh(self.v(x))
        z = torch.tanh(self.inp(x))
        h = (1 - z) * u + z * v
        z = torch.tanh(self.hidden(h))
        h = (1 - z) * u + z * v
        return self.out(h)


class Fourier(nn.Module):
    """A fixed Fourier-feature embedding (a buffer) before an MLP."""

    def __init__(self, d_in, d_out, m=3):
        super().__init__()
        self.register_buffer("B", torch.randn(m, d_in))
        self.mlp = sequential(2 * m, d_out)

    def forward(self, x):
        p = 2 * math.pi * x @ self.B.T
        return self.mlp(torch.cat([torch.sin(p), torch.cos(p)], dim=-1))


class NTKParameterized(nn.Module):
    """Layers in the NTK parameterization: ``F.linear(h, W / √fan_in, b)``, a scaled weight in the product."""

    def __init__(self, d_in, d_out, width=6):
        super().__init__()
        dims = [d_in, width, width, d_out]
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(b, a)) for a, b in itertools.pairwise(dims))
        self.biases = nn.ParameterList(nn.Parameter(torch.randn(b)) for b in dims[1:])

    def forward(self, x):
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = nn.functional.linear(x, w / math.sqrt(w.shape[1]), b)
            if i < len(self.weights) - 1:
                x = torch.tanh(x)
        return x


class MatmulAndBroadcast(nn.Module):
    """One weight used both in a matrix product and in a broadcast multiply (the dense branch)."""

    def __init__(self, d_in, d_out, width=6):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, d_in))
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        via_product = x @ self.w.T
        via_broadcast = (x.unsqueeze(1) * self.w).sum(-1)
        return self.out(torch.tanh(via_product) + torch.sin(via_broadcast))


class ScaledBias(nn.Module):
    """Biases added with a scale (``h Wᵀ + b / 2``): a bias use whose per-point gradient is scaled."""

    def __init__(self, d_in, d_out, width=6):
        super().__init__()
        self.hidden = nn.Parameter(torch.randn(width, d_in))
        self.b = nn.Parameter(torch.randn(width))
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.hidden.T + self.b / 2))


class TransposedCopy(nn.Module):
    """A square weight used through a reshaped copy of its transpose (values of Wᵀ, contiguous strides)."""

    def __init__(self, d_in, d_out, width=6):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.w = nn.Parameter(torch.randn(width, width))
        self.out = nn.Linear(width, d_out)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        w_t = self.w.t().reshape(-1).reshape(self.w.shape)  # a copy: Wᵀ laid out row-major
        return self.out(torch.tanh(h @ w_t.t()) + torch.sin(h @ self.w.t()))


class RWFLinear(nn.Module):
    """Random weight factorization, one scale per output unit: ``W = diag(exp(s)) V`` through ``F.linear``."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.s = nn.Parameter(0.1 * torch.randn(d_out) + 0.5)
        self.v = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.b = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x):
        return torch.nn.functional.linear(x, torch.exp(self.s)[:, None] * self.v, self.b)


class KernelRWF(nn.Module):
    """JAX-PI's layout: a kernel ``(d_in, d_out) = V ⊙ exp(g)`` scaled per column, ``y = x @ kernel + b``."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.g = nn.Parameter(0.1 * torch.randn(d_out))
        self.v = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        self.b = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x):
        return x @ (self.v * torch.exp(self.g)) + self.b


def rwf_mlp(layer, d_in, d_out, width=6):
    return nn.Sequential(layer(d_in, width), nn.Tanh(), layer(width, width), nn.Tanh(), layer(width, d_out))


class JaxPiNetwork(nn.Module):
    """JAX-PI's Allen–Cahn network in small: a hard periodic embedding of x (first input), random
    Fourier features (a buffer), and a modified MLP whose every layer is RWF."""

    def __init__(self, d_in, d_out, width=6, m=3):
        super().__init__()
        self.register_buffer("B", torch.randn(m, d_in + 1))
        self.u, self.v, self.inp = (RWFLinear(2 * m, width) for _ in range(3))
        self.hidden = KernelRWF(width, width)
        self.out = RWFLinear(width, d_out)

    def forward(self, x):
        periodic = torch.cat([torch.cos(math.pi * x[:, :1]), torch.sin(math.pi * x[:, :1]), x[:, 1:]], dim=-1)
        p = 2 * math.pi * periodic @ self.B.T
        features = torch.cat([torch.sin(p), torch.cos(p)], dim=-1)
        u, v = torch.tanh(self.u(features)), torch.tanh(self.v(features))
        z = torch.tanh(self.inp(features))
        h = (1 - z) * u + z * v
        z = torch.tanh(self.hidden(h))
        return self.out((1 - z) * u + z * v)


NETWORKS = {
    "tanh": lambda d_in, d_out: sequential(d_in, d_out),
    "rwf_rows": lambda d_in, d_out: rwf_mlp(RWFLinear, d_in, d_out),
    "rwf_columns": lambda d_in, d_out: rwf_mlp(KernelRWF, d_in, d_out),
    "jax_pi_combined": JaxPiNetwork,
    "sin": lambda d_in, d_out: sequential(d_in, d_out, Sine),
    "silu": lambda d_in, d_out: sequential(d_in, d_out, nn.SiLU),
    "gelu": lambda d_in, d_out: sequential(d_in, d_out, nn.GELU),
    "softplus": lambda d_in, d_out: sequential(d_in, d_out, nn.Softplus),
    "adaptive": lambda d_in, d_out: sequential(d_in, d_out, AdaptiveTanh),
    "skip": Skip,
    "modified_mlp": ModifiedMLP,
    "fourier": Fourier,
    "ntk_parameterization": NTKParameterized,
    "matmul_and_broadcast": MatmulAndBroadcast,
    "transposed_copy": TransposedCopy,
    "scaled_bias": ScaledBias,
}


def autograd_laplacian(net, x):
    x = x.detach().clone().requires_grad_(True)
    u = net(x)[:, :1]
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    total = 0
    for i in range(x.shape[1]):
        total = total + torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i : i + 1]
    return total


def autograd_mixed(net, x):
    x = x.detach().clone().requires_grad_(True)
    u = net(x)[:, :1]
    u_0 = torch.autograd.grad(u.sum(), x, create_graph=True)[0][:, :1]
    return torch.autograd.grad(u_0.sum(), x, create_graph=True)[0][:, -1:] + u_0


def func_laplacian(net, x):
    def u(xi):
        return net(xi.unsqueeze(0))[0, 0]

    return vmap(hessian(u))(x).diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)


def func_gradient(net, x):
    return vmap(jacfwd(lambda xi: net(xi.unsqueeze(0))[0]))(x)[:, 0, :]


STYLES = {
    "autograd_laplacian": autograd_laplacian,
    "autograd_mixed": autograd_mixed,
    "helpers_laplacian": lambda net, x: laplacian(lambda y: net(y)[:, :1], x),
    "helpers_first": lambda net, x: partial(net, x, x.shape[1] - 1),
    "func_hessian": func_laplacian,
    "func_jacfwd": func_gradient,
}


class Problem(nn.Module):
    def __init__(self, net, style, d_out=1):
        super().__init__()
        self.net, self.style = net, style

    def residuals(self, batch):
        # The network is shared by both terms: its weights are used by both blocks.
        return {"bc": self.net(batch["bc"]) - 1.0, "pde": STYLES[self.style](self.net, batch["res"]) + 0.5}


def assert_gram_exact(model, batch):
    got = per_point_squared_norms(model, batch, paths=("gram",))
    want = reference_point_norms(model, batch)
    assert set(got.norms) == set(want)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0, msg=name)
    return got


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("style", list(STYLES))
def test_every_network_and_residual_style_is_exact(network, style):
    torch.manual_seed(0)
    d_in = 2
    model = Problem(NETWORKS[network](d_in, 1), style).double()
    assert_gram_exact(model, make_batch(d_in))


@pytest.mark.parametrize("d_in", [1, 2, 3])
@pytest.mark.parametrize("style", ["autograd_laplacian", "helpers_laplacian", "func_hessian"])
def test_one_two_and_three_input_dimensions(d_in, style):
    torch.manual_seed(d_in)
    assert_gram_exact(Problem(sequential(d_in, 1), style).double(), make_batch(d_in, seed=d_in))


class NavierStokesLike(nn.Module):
    """A vector field (u, v, p) with one residual per equation, nonlinear in the outputs."""

    def __init__(self):
        super().__init__()
        self.net = sequential(2, 3, width=8)

    def residuals(self, batch):
        x = batch["res"].detach().clone().requires_grad_(True)
        out = self.net(x)
        u, v, p = out[:, :1], out[:, 1:2], out[:, 2:]

        def grad(f):
            return torch.autograd.grad(f.sum(), x, create_graph=True)[0]

        du, dv, dp = grad(u), grad(v), grad(p)
        u_xx = grad(du[:, :1])[:, :1]
        return {
            "momentum_x": u * du[:, :1] + v * du[:, 1:] + dp[:, :1] - 0.01 * u_xx,
            "momentum_y": u * dv[:, :1] + v * dv[:, 1:] + dp[:, 1:],
            "continuity": du[:, :1] + dv[:, 1:],
            "wall": self.net(batch["bc"])[:, :2],  # two rows per point
        }


def test_vector_valued_outputs_one_residual_per_equation():
    torch.manual_seed(5)
    got = assert_gram_exact(NavierStokesLike().double(), make_batch(2, seed=5))
    assert got.num_rows["wall"] == 6


def test_taylor_mlp_streams_take_the_same_path():
    class Heat(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TaylorMLP(2, 6, 2, fourier_features=(3, 1.0))

        def residuals(self, batch):
            d = self.net.taylor(batch["res"], first=[1], second=[0])
            return {"bc": self.net(batch["bc"]), "pde": d[1] - 0.1 * d[0, 0]}

    torch.manual_seed(6)
    assert_gram_exact(Heat().double(), make_batch(2, seed=6))


def test_large_groups_are_taken_in_slices(monkeypatch):
    from lightning_ntk.jacobian import dispatch

    monkeypatch.setattr(dispatch, "_GRAM_MAX_POINTS", 4)
    torch.manual_seed(7)
    model = Problem(sequential(1, 1), "autograd_laplacian").double()
    assert_gram_exact(model, make_batch(1, seed=7, n_bc=2, n_res=11))


def test_leaves_param_grad_alone_and_excludes_frozen_parameters():
    torch.manual_seed(8)
    model = Problem(sequential(2, 1), "autograd_laplacian").double()
    batch = make_batch(2, seed=8)
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel, strict=True):
        p.grad = s.clone()
    model.net[0].weight.requires_grad_(False)
    got = per_point_squared_norms(model, batch, paths=("gram",))
    trainable = [p for p in model.parameters() if p.requires_grad]
    want = reference_point_norms(model, batch, trainable)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0)
    for p, s in zip(model.parameters(), sentinel, strict=True):
        assert torch.equal(p.grad, s)


class Concatenated(nn.Module):
    """DeepXDE style: one network evaluation on the concatenation of every term's points."""

    def __init__(self, style):
        super().__init__()
        self.net = sequential(2, 1)
        self.style = style

    def residuals(self, batch):
        x = torch.cat([batch["bc"], batch["res"], batch["ic"]])
        nb, nr = batch["bc"].shape[0], batch["res"].shape[0]
        if self.style == "autograd":
            x = x.detach().clone().requires_grad_(True)
            u = self.net(x)
            du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
            u_xx = torch.autograd.grad(du[:, :1].sum(), x, create_graph=True)[0][:, :1]
            u_t = du[:, 1:]
        else:
            u, u_t, u_xx = self.net(x), partial(self.net, x, 1), partial(self.net, x, 0, 0)
        return {"bc": u[:nb] - 1.0, "pde": u_t[nb : nb + nr] - u_xx[nb : nb + nr], "ic": u_t[nb + nr :]}


@pytest.mark.parametrize("style", ["autograd", "helpers"])
def test_one_evaluation_on_concatenated_points_of_several_terms(style):
    torch.manual_seed(12)
    batch = {**make_batch(2, seed=12), "ic": torch.rand(4, 2, dtype=torch.float64)}
    assert_gram_exact(Concatenated(style).double(), batch)


class BlockAndMore(nn.Module):
    """Residual point n also reads row n of the boundary block: its gradient is not all in one block."""

    def __init__(self):
        super().__init__()
        self.net = sequential(2, 1)

    def residuals(self, batch):
        nb, nr = batch["bc"].shape[0], batch["res"].shape[0]
        u = self.net(torch.cat([batch["bc"], batch["res"]]))
        return {"bc": u[:nb], "pde": u[nb:] + 0.5 * u[:nr]}


def test_a_block_must_hold_all_of_a_terms_gradient():
    torch.manual_seed(13)
    model = BlockAndMore().double()
    batch = make_batch(2, seed=13, n_bc=7, n_res=3)
    # The layout check itself rejects it (not only the later comparison on three points).
    params = dict(model.named_parameters())
    result = gram_squared_norms(batch, params, model.residuals)
    assert list(result.unsupported) == ["pde"] and "do not map to the points" in result.unsupported["pde"]
    assert list(result.norms) == ["bc"]  # the other term is still covered
    with pytest.warns(UserWarning, match="Gram path"):
        got = per_point_squared_norms(model, batch)
    assert got.paths["bc"] == "gram" and got.paths["pde"] != "gram"
    want = reference_point_norms(model, batch)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0)


class MeanConstraint(nn.Module):
    """Neumann-type problems fix the constant with a one-row term: the mean of u over all points."""

    def __init__(self):
        super().__init__()
        self.net = sequential(2, 1)

    def residuals(self, batch):
        return {
            "pde": autograd_laplacian(self.net, batch["res"]) + 1.0,
            "mean": self.net(batch["res"]).mean().reshape(1),
        }


def test_a_one_row_term_over_all_points_is_one_point():
    torch.manual_seed(14)
    got = assert_gram_exact(MeanConstraint().double(), make_batch(2, seed=14))
    assert got.num_rows == {"pde": 7, "mean": 1}
    assert per_point_squared_norms(MeanConstraint().double(), make_batch(2, seed=14)).paths["mean"] == "gram"


# --- uses the identities do not model: detected, and the result is the loop's -------------------------


class WeightFactorized(nn.Module):
    """A weight built from two parameters other than ``exp(s) ⊙ V``: ``W = A ⊙ B``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(6, 2) * 0.1 + 1)
        self.v = nn.Parameter(torch.randn(6, 2))
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(x @ (self.a * self.v).T))


class ElementwiseFactorized(nn.Module):
    """``W = exp(S) ⊙ V`` with a factor per entry (not per row or column): not rank-one per point."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.randn(6, 2) * 0.1)
        self.v = nn.Parameter(torch.randn(6, 2))
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(x @ (torch.exp(self.s) * self.v).T))


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 3, kernel_size=1)
        self.out = nn.Linear(3, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.conv(x.unsqueeze(-1)).squeeze(-1)))


class SlicedWeight(nn.Module):
    """Only part of a weight matrix used in a product (a slice, not the whole W)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(x @ self.w[:, : x.shape[1]].T))


class MixesPoints(nn.Module):
    """Row n of the residual depends on every point (a smoothing over the batch)."""

    def __init__(self):
        super().__init__()
        self.net = sequential(2, 1)

    def forward(self, x):
        u = self.net(x)
        return u - u.mean()


class _HiddenLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, w):
        return x @ w.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w, grad.T @ x


class CustomFunction(nn.Module):
    """A custom autograd.Function runs its ops without autograd: the uses inside are not recorded."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2))
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(_HiddenLinear.apply(x, self.w)))


FALLBACKS = {
    "weight_factorized": WeightFactorized,
    "elementwise_factorized": ElementwiseFactorized,
    "conv": Conv,
    "sliced": SlicedWeight,
    "mixes_points": MixesPoints,
    "custom_function": CustomFunction,
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_unsupported_uses_fall_back_with_a_message_and_stay_exact(case):
    torch.manual_seed(9)
    model = Problem(FALLBACKS[case]().double(), "autograd_laplacian").double()
    batch = make_batch(2, seed=9)
    with pytest.raises(ValueError, match="'gram' path"):
        per_point_squared_norms(model, batch, paths=("gram",))
    with pytest.warns(UserWarning, match="Gram path"):
        got = per_point_squared_norms(model, batch)
    # With mixes_points the autograd Laplacian of u − mean(u) is exactly that of u (the mean's input
    # gradient sums to zero), so only "bc" mixes points; every other case affects both terms.
    assert got.paths["bc"] != "gram" and (case == "mixes_points" or got.paths["pde"] != "gram")
    want = reference_point_norms(model, batch)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0)


def test_a_failed_check_is_remembered_per_module_and_batch_layout():
    torch.manual_seed(10)
    model = Problem(MixesPoints().double(), "helpers_laplacian").double()
    batch = make_batch(2, seed=10)
    with pytest.warns(UserWarning, match="Gram path"):
        per_point_squared_norms(model, batch)
    from lightning_ntk.memory import memory_of

    assert all("bc" in v.off_gram for v in memory_of(model).exact.values())
    assert per_point_squared_norms(model, batch).paths["bc"] != "gram"  # decided once, remembered


def decided(model):
    from lightning_ntk.memory import memory_of

    return {
        key: (e.refused, dict(e.off_gram), e.gram, e.checked)
        for key, e in memory_of(model).exact.items()
        if (e.refused, e.off_gram, e.gram, e.checked) != (None, {}, None, False)
    }


@pytest.mark.parametrize("confirmed_first", [False, True], ids=["first call", "layout already confirmed"])
def test_a_non_finite_point_gives_nan_at_that_point_only_and_leaves_the_path_undecided(confirmed_first):

    torch.manual_seed(11)
    model = Problem(sequential(1, 1), "autograd_laplacian").double()
    batch = make_batch(1, seed=11)
    if confirmed_first:
        assert_gram_exact(model, batch)
    verdicts = decided(model)
    bad = {"bc": batch["bc"], "res": batch["res"].clone()}
    bad["res"][2] = float("nan")
    got = per_point_squared_norms(model, bad)
    assert got.paths == {"bc": "gram", "pde": "gram"}
    assert got.norms["pde"].isnan().nonzero().flatten().tolist() == [2]
    assert bool(got.norms["bc"].isfinite().all())
    # The other points' norms are those of the batch without the bad point (hand-built Jacobian).
    keep = torch.tensor([i for i in range(bad["res"].shape[0]) if i != 2])
    want = reference_point_norms(model, {"bc": batch["bc"], "res": batch["res"][keep]})
    torch.testing.assert_close(got.norms["pde"][keep], want["pde"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got.norms["bc"], want["bc"], rtol=1e-10, atol=0)
    assert decided(model) == verdicts  # nothing decided on a non-finite batch
    assert_gram_exact(model, batch)  # the same layout with finite values: still the Gram path


# ---------------------------------------------------------------- one term off the path, the rest on it


class ThreeTerms(nn.Module):
    """Heat-type problem in the ordinary autograd style; only the PDE term subtracts its batch mean."""

    def __init__(self):
        super().__init__()
        self.net = sequential(2, 1)

    def residuals(self, batch):
        x = batch["res"].clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        u_xx = torch.autograd.grad(du[:, 0].sum(), x, create_graph=True)[0][:, 0]
        pde = du[:, 1] - 0.1 * u_xx
        return {"ic": self.net(batch["ic"]), "bc": self.net(batch["bc"]), "pde": pde - pde.mean()}


def test_a_point_mixing_term_leaves_the_gram_path_alone():
    torch.manual_seed(21)
    model = ThreeTerms().double()
    batch = {**make_batch(2, seed=21, n_bc=4, n_res=6), "ic": torch.rand(5, 2, dtype=torch.float64)}
    with pytest.warns(UserWarning) as caught:
        got = per_point_squared_norms(model, batch)
    assert got.paths == {"ic": "gram", "bc": "gram", "pde": "rows"}
    want = reference_point_norms(model, batch)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0)
    [message] = [str(w.message) for w in caught if str(w.message).startswith("Exact NTK traces of")]
    lines = message.splitlines()
    assert len(lines) == 2 and "['pde'] takes the 'rows' path (one backward pass" in lines[0]
    assert "The other terms stay on the Gram path" in lines[1] and "Subsample" in lines[1] and "'fd'" in lines[1]
    assert "README" not in message


def test_first_sentence_keeps_whole_sentences():
    from lightning_ntk.jacobian.common import first_sentence

    text = "RuntimeError: attempting to call Tensor.requires_grad_() inside vmap. Please use x.requires_grad."
    assert first_sentence(text) == "RuntimeError: attempting to call Tensor.requires_grad_() inside vmap."
    assert first_sentence("one line\nsecond") == "one line"


# ---------------------------------------------------------------- tensor subclasses that re-wrap their inputs


class Labelled(torch.Tensor):
    """Behaves like PINA's ``LabelTensor``: ``Labelled(t, labels)`` re-wraps ``t`` through the legacy
    ``Tensor.__new__`` (an ``alias`` that a dispatch mode sees first), and keeps column labels."""

    @staticmethod
    def __new__(cls, x, labels):
        return super().__new__(cls, x)

    def __init__(self, x, labels):
        self.labels = list(labels)


class LabelledProblem(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = sequential(2, 1)

    def residuals(self, batch):
        x = Labelled(batch["res"].clone(), ["x", "t"]).requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        return {"bc": self.net(batch["bc"]) - 1.0, "pde": du[:, 1:] - du[:, :1]}


def test_a_re_wrapping_tensor_subclass_gets_exact_traces_by_a_fallback_with_its_reason():
    torch.manual_seed(22)
    model = LabelledProblem().double()
    batch = make_batch(2, seed=22)
    with pytest.warns(UserWarning, match="failed under the Gram recording") as caught:
        got = per_point_squared_norms(model, batch)
    assert "Creating a new Tensor subclass Labelled" in str(caught[0].message)
    assert got.paths == {"bc": "loop", "pde": "loop"}
    want = reference_point_norms(model, batch)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0)


def test_a_thin_parameter_sums_factors_that_autograd_returns_as_zero_tensors():
    # torch 2.15's autograd hands some unreached gradients back as ZeroTensors, which are immutable: the
    # sum of a thin parameter's rank-one factors must not write into one (it sent the 1-D Poisson example
    # to the slow vmap path there). Per point: Σ_k x_k ⊗ y_k with y of width 1.
    from lightning_ntk.jacobian.gram.accumulator import Accumulator

    g = torch.Generator().manual_seed(0)
    n, a = 5, 3
    zero = torch._efficientzerotensor((1, n, a), dtype=torch.float64)
    x1, y0, y1 = (torch.rand(1, n, w, generator=g, dtype=torch.float64) for w in (a, 1, 1))
    acc = Accumulator("w", (a, 1), torch.float64, None)
    acc.add_factors(0, zero, y0)
    acc.add_factors(0, x1, y1)
    torch.testing.assert_close(acc.thin_sum(0), x1[0] * y1[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.squared_norms(n), (x1[0] * y1[0]).square().sum(1), rtol=1e-12, atol=0)


def test_per_parameter_norms_of_several_dtypes_add_up_with_promotion():
    # A module whose parameters differ in dtype gives per-parameter norms of several dtypes: they are
    # summed with promotion to the widest dtype, as the adds they replaced did.
    from lightning_ntk.jacobian.gram.accumulator import sum_all

    parts = [torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25], dtype=torch.float64), torch.tensor([1.0, 1.0])]
    total = sum_all(parts)
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, torch.tensor([2.5, 3.25], dtype=torch.float64))
    torch.testing.assert_close(sum_all(parts[::2]), torch.tensor([2.0, 3.0]))

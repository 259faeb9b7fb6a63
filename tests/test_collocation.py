"""The pure-torch core of adaptive collocation: the per-point NTK diagonal, densities, draws, and
importance-weighted causal scales, each against an independent computation."""

import math

import pytest
import torch
from conftest import AutogradPoisson, TwoFieldModel, poisson_batch, reference_point_norms, two_field_batch
from torch import nn

from lightning_ntk import CausalResiduals, CausalWeighting, PINNModule, ntk_diagonal, ntk_traces
from lightning_ntk.causal import chunk_losses, chunk_scales, point_scales
from lightning_ntk.collocation import draw, scored_density

M, EPS = 4, 2.0


class Heat(PINNModule):
    """A causal term (``pde``, time in column 1) and a plain one (``ic``)."""

    def __init__(self, causal: bool = True) -> None:
        cw = CausalWeighting(time_column=1, num_chunks=M, epsilon=EPS)
        super().__init__(terms=["ic", "pde"], causal={"pde": cw} if causal else None)
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def residuals(self, batch):
        x = batch["pde"].clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        return {"ic": self.net(batch["ic"])[:, 0] - 1.0, "pde": du[:, 1] - 0.1 * du[:, 0] + u[:, 0] ** 2}

    def residual_points(self, batch):
        return {"pde": batch["pde"]}


def heat_batch(n: int = 11, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return {
        "ic": torch.stack([torch.rand(4, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)], 1),
        "pde": torch.rand(n, 2, generator=g, dtype=torch.float64),
    }


def causal_scales_by_hand(residual: torch.Tensor, times: torch.Tensor, omega=None) -> torch.Tensor:
    """``s_n = w_k ω_n N / (M Σ_{j∈k} ω_j)`` from scratch, one chunk at a time."""
    n = residual.shape[0]
    omega = torch.ones(n, dtype=residual.dtype) if omega is None else omega
    chunk = [min(int(t * M), M - 1) for t in times.tolist()]
    losses, mass = [], []
    for k in range(M):
        members = [i for i in range(n) if chunk[i] == k]
        m = sum(float(omega[i]) for i in members)
        mass.append(m)
        losses.append(sum(float(omega[i]) * float(residual[i]) ** 2 for i in members) / m if members else 0.0)
    weights = [math.exp(-EPS * sum(losses[:k])) for k in range(M)]
    return torch.tensor(
        [weights[chunk[i]] * float(omega[i]) * n / (M * mass[chunk[i]]) for i in range(n)], dtype=torch.float64
    )


def test_diagonal_of_a_scalar_term_equals_the_per_entry_loop():
    torch.manual_seed(0)
    model, batch = AutogradPoisson().double(), poisson_batch(n_r=9)
    got, want = ntk_diagonal(model, batch), reference_point_norms(model, batch)
    for name in ("bc", "pde"):
        assert got[name].shape == (batch[0 if name == "bc" else 1].shape[0],)
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)


def test_diagonal_of_a_vector_valued_term_sums_over_the_points_rows():
    torch.manual_seed(0)
    model, batch = TwoFieldModel().double(), two_field_batch()
    got, want = ntk_diagonal(model, batch), reference_point_norms(model, batch)
    for name in ("data", "pde"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)
    traces = ntk_traces(model, batch)
    for name in traces:
        torch.testing.assert_close(got[name].sum(), traces[name], rtol=1e-12, atol=0)


def test_diagonal_of_a_causal_term_is_the_causally_scaled_one():
    torch.manual_seed(0)
    model, batch = Heat(), heat_batch()
    got = ntk_diagonal(model, batch)
    unscaled = reference_point_norms(model, batch)  # residuals() is unscaled; the loss scales it
    with torch.enable_grad():
        r = model.residuals(batch)["pde"].detach()
    s = causal_scales_by_hand(r, batch["pde"][:, 1])
    torch.testing.assert_close(got["pde"], s * unscaled["pde"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got["ic"], unscaled["ic"], rtol=1e-10, atol=0)
    # Its sum is the causal trace the callback balances.
    view = CausalResiduals(model, model.causal, model.residual_points).freeze(batch)
    torch.testing.assert_close(got["pde"].sum(), ntk_traces(view, batch)["pde"], rtol=1e-12, atol=0)


def test_sketched_diagonal_is_unbiased_with_the_stated_variance():
    torch.manual_seed(0)
    model, batch = AutogradPoisson().double(), poisson_batch(n_r=6)
    exact = reference_point_norms(model, batch)["pde"]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([ntk_diagonal(model, batch, num_probes=1, generator=g)["pde"] for _ in range(400)])
    # Gaussian probes, scalar residual: Var = 2 K² per draw; 5 standard errors of the mean of 400.
    assert ((draws.mean(0) - exact).abs() <= 5 * math.sqrt(2 / 400) * exact).all()
    torch.testing.assert_close(draws.var(0), 2 * exact.square(), rtol=0.35, atol=0)


def test_sketched_diagonal_error_shrinks_with_probes():
    torch.manual_seed(0)
    model, batch = TwoFieldModel().double(), two_field_batch(n_r=12)
    exact = ntk_diagonal(model, batch)["pde"]
    g = torch.Generator().manual_seed(1)

    def error(k):
        runs = [ntk_diagonal(model, batch, num_probes=k, generator=g)["pde"] for _ in range(40)]
        return torch.stack([(d - exact).abs() / exact for d in runs]).mean()

    one, sixteen = error(1), error(16)
    assert sixteen < one / 2.5  # √16 = 4 in expectation


def test_sketched_diagonal_rejects_bad_probe_counts():
    with pytest.raises(ValueError, match="num_probes"):
        ntk_diagonal(AutogradPoisson(), poisson_batch(dtype=torch.float32), num_probes=0)


def test_scored_density_is_the_rad_formula():
    q = torch.tensor([0.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    a, c = 2.0, 0.5
    m = sum(v**a for v in q.tolist()) / 4
    raw = [v**a / m + c for v in q.tolist()]
    want = torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64)
    torch.testing.assert_close(scored_density(q, a, c), want, rtol=1e-14, atol=0)
    # A mean from elsewhere (every rank's pool) replaces the local one.
    raw = [v**a / 3.0 + c for v in q.tolist()]
    want = torch.tensor([v / sum(raw) for v in raw], dtype=torch.float64)
    torch.testing.assert_close(scored_density(q, a, c, mean=torch.tensor(3.0)), want, rtol=1e-14, atol=0)


def test_draws_follow_the_density_and_their_weights_undo_it():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    idx, omega = draw(p, 40_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx, minlength=4).double() / 40_000
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / 40_000).sqrt()).all()
    torch.testing.assert_close(omega, 1 / (4 * p[idx]), rtol=0, atol=0)
    f = torch.tensor([1.0, -2.0, 3.0, 7.0], dtype=torch.float64)
    # E_p[ω f] is the uniform mean of f over the pool.
    assert abs(float((omega * f[idx]).mean()) - float(f.mean())) < 0.05


def test_point_scales_with_unit_weights_are_the_chunk_scales():
    chunks = torch.tensor([0, 0, 1, 3, 3, 3])
    w = torch.tensor([1.0, 0.5, 0.25, 0.1], dtype=torch.float64)
    torch.testing.assert_close(point_scales(chunks, w), chunk_scales(chunks, w)[chunks])
    torch.testing.assert_close(
        point_scales(chunks, w, torch.ones(6, dtype=torch.float64)), chunk_scales(chunks, w)[chunks]
    )


def test_importance_weighted_causal_loss_and_scales_equal_the_hand_computation():
    g = torch.Generator().manual_seed(0)
    times = torch.rand(13, generator=g, dtype=torch.float64)
    r = torch.randn(13, generator=g, dtype=torch.float64)
    omega = 0.2 + 2 * torch.rand(13, generator=g, dtype=torch.float64)
    cw = CausalWeighting(time_column=1, num_chunks=M, epsilon=EPS)
    points = torch.stack([torch.zeros(13, dtype=torch.float64), times], 1)
    scaled, _ = cw.apply(r, points, omega)
    s = causal_scales_by_hand(r, times, omega)
    torch.testing.assert_close(scaled, s.sqrt() * r, rtol=1e-12, atol=0)
    # The loss is mean_k(w_k L̂_k) with the self-normalised chunk losses.
    chunk = (times * M).floor().long().clamp(max=M - 1)
    losses = chunk_losses(r, chunk, M, omega)
    for k in range(M):
        members = chunk == k
        want = (omega[members] * r[members] ** 2).sum() / omega[members].sum()
        torch.testing.assert_close(losses[k], want, rtol=1e-12, atol=0)


def test_diagonal_of_a_pinn_module_counts_the_importance_weights_set_on_it():
    torch.manual_seed(0)
    model, batch = AutogradPoisson().double(), poisson_batch(n_r=9)
    want = reference_point_norms(model, batch)
    omega = torch.linspace(0.5, 2.0, 9, dtype=torch.float64)
    model.set_point_weights({"pde": omega})
    got = ntk_diagonal(model, batch)
    torch.testing.assert_close(got["pde"], omega * want["pde"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got["bc"], want["bc"], rtol=1e-10, atol=0)


def test_point_scales_with_unit_weights_are_the_chunk_scales_at_each_point_bit_for_bit():
    chunks = torch.tensor([0, 0, 2, 2, 2, 1, 0])
    weights = torch.tensor([1.0, 0.3, 0.7], dtype=torch.float64)
    unit = point_scales(chunks, weights, torch.ones(7, dtype=torch.float64))
    assert torch.equal(unit, point_scales(chunks, weights)) and torch.equal(unit, chunk_scales(chunks, weights)[chunks])

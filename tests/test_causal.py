"""Causal weighting (lightning_ntk.causal) against hand computations on tiny problems."""

import math

import pytest
import torch
from conftest import reference_point_norms
from torch import nn

from lightning_ntk.causal import CausalWeighting, causal_trace, causal_weights, chunk_losses, time_chunks


def test_weights_use_the_losses_of_earlier_chunks_only():
    losses = torch.tensor([0.5, 2.0, 0.25, 1.0], dtype=torch.float64)
    eps = 0.7
    want = torch.tensor([math.exp(-eps * sum(losses[:k].tolist())) for k in range(4)], dtype=torch.float64)
    got = causal_weights(losses, eps)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert got[0] == 1.0  # nothing before the first chunk: a sum that included chunk k would give exp(-ε·0.5)


def test_weights_carry_no_gradient():
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    assert not causal_weights(losses, 1.0).requires_grad


def test_chunk_losses_equal_a_loop_over_chunks_with_uneven_and_empty_chunks():
    g = torch.Generator().manual_seed(0)
    times = torch.tensor([0.05, 0.3, 0.31, 0.95, 0.99, 0.6], dtype=torch.float64)
    residual = torch.randn(6, 2, generator=g, dtype=torch.float64)
    chunks = time_chunks(times, 4, 0.0, 1.0)
    assert chunks.tolist() == [0, 1, 1, 3, 3, 2]
    got = chunk_losses(residual, chunks, 5)  # chunk 4 has no point
    for k in range(5):
        rows = [n for n in range(6) if chunks[n] == k]
        want = sum(float(residual[n].square().mean()) for n in rows) / len(rows) if rows else 0.0
        assert float(got[k]) == pytest.approx(want, rel=1e-14, abs=0)


def test_the_loss_is_the_weighted_mean_and_its_gradient_flows_through_the_losses_only():
    g = torch.Generator().manual_seed(1)
    points = torch.rand(12, 2, generator=g, dtype=torch.float64)
    residual = torch.randn(12, generator=g, dtype=torch.float64, requires_grad=True)
    cw = CausalWeighting(time_column=1, num_chunks=3, epsilon=2.0)
    loss = cw.loss(residual, points)
    chunks = [min(int(t * 3), 2) for t in points[:, 1].tolist()]
    losses = [sum(float(residual[n]) ** 2 for n in range(12) if chunks[n] == k) / chunks.count(k) for k in range(3)]
    weights = [math.exp(-2.0 * sum(losses[:k])) for k in range(3)]
    want = sum(w * loss_k for w, loss_k in zip(weights, losses, strict=True)) / 3
    assert float(loss) == pytest.approx(want, rel=1e-13)
    (grad,) = torch.autograd.grad(loss, residual)
    # d/dr_n of (1/3) Σ_k w_k L_k with w constant: (1/3) w_k 2 r_n / |chunk k|
    want = [weights[chunks[n]] * 2 * float(residual[n]) / chunks.count(chunks[n]) / 3 for n in range(12)]
    torch.testing.assert_close(grad, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


class Heat(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def residuals(self, points):
        x = points.clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        return {"pde": du[:, 1] - 0.1 * du[:, 0]}


def test_causal_trace_weights_each_points_ntk_norm_by_its_chunk():
    torch.manual_seed(2)
    model = Heat()
    t = torch.tensor([0.1, 0.2, 0.45, 0.55, 0.8, 0.9], dtype=torch.float64)  # two points per chunk
    points = torch.stack([torch.rand(6, dtype=torch.float64), t], dim=1)
    norms = reference_point_norms(model, points)["pde"]  # hand-built Jacobian, one row at a time
    residual = model.residuals(points)["pde"].detach()
    cw = CausalWeighting(time_column=1, num_chunks=3, epsilon=5.0)
    got = cw.trace(norms, points, residual)
    losses = [float(residual[2 * k : 2 * k + 2].square().mean()) for k in range(3)]
    weights = [math.exp(-5.0 * sum(losses[:k])) for k in range(3)]
    want = sum(weights[n // 2] * float(norms[n]) for n in range(6))
    assert float(got) == pytest.approx(want, rel=1e-13)
    # JAX-PI's form with equal chunks: N · mean_k(w_k · mean of the chunk's NTK diagonal).
    jax_pi = 6 * sum(weights[k] * float(norms[2 * k : 2 * k + 2].mean()) for k in range(3)) / 3
    assert float(got) == pytest.approx(jax_pi, rel=1e-13)
    assert float(causal_trace(norms, cw.chunks(points), torch.ones(3))) == pytest.approx(float(norms.sum()))


def test_epsilon_schedule_advances_once_every_chunk_is_fitted_and_round_trips():
    cw = CausalWeighting(time_column=0, num_chunks=2, epsilon_schedule=[0.01, 0.1, 1.0], advance_at=0.99)
    points = torch.tensor([[0.1], [0.9]])
    cw.loss(torch.tensor([10.0, 0.0]), points)  # w_1 = exp(-0.01·100) = 0.37: not fitted yet
    assert not cw.advance() and cw.epsilon == 0.01
    cw.loss(torch.tensor([0.1, 0.0]), points)  # w_1 = exp(-0.01·0.01) > 0.99
    assert cw.advance() and cw.epsilon == 0.1
    other = CausalWeighting(time_column=0, num_chunks=2, epsilon_schedule=[0.01, 0.1, 1.0])
    other.load_state_dict(cw.state_dict())
    assert other.epsilon == 0.1
    with pytest.raises(ValueError, match="schedule"):
        CausalWeighting(time_column=0, epsilon_schedule=[1.0, 0.1]).load_state_dict(cw.state_dict())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"time_column": -1}, "time_column"),
        ({"time_column": 0, "num_chunks": 0}, "num_chunks"),
        ({"time_column": 0, "epsilon": -1.0}, "epsilon"),
        ({"time_column": 0, "t_range": (1.0, 0.0)}, "t_range"),
        ({"time_column": 0, "epsilon_schedule": [1.0, 0.5]}, "epsilon_schedule"),
        ({"time_column": 0, "advance_at": 1.0}, "advance_at"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalWeighting(**kwargs)

"""Causal weighting (lightning_ntk.causal) against hand computations on tiny problems."""

import math
import warnings

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
    losses = [
        sum(float(residual[n].detach()) ** 2 for n in range(12) if chunks[n] == k) / chunks.count(k) for k in range(3)
    ]
    weights = [math.exp(-2.0 * sum(losses[:k])) for k in range(3)]
    want = sum(w * loss_k for w, loss_k in zip(weights, losses, strict=True)) / 3
    assert float(loss.detach()) == pytest.approx(want, rel=1e-13)
    (grad,) = torch.autograd.grad(loss, residual)
    # d/dr_n of (1/3) Σ_k w_k L_k with w constant: (1/3) w_k 2 r_n / |chunk k|
    want = [weights[chunks[n]] * 2 * float(residual[n].detach()) / chunks.count(chunks[n]) / 3 for n in range(12)]
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
    got = causal_trace(norms, *cw.weights(residual, points))
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
    cw.advance_on_device()
    assert cw.epsilon == 0.01 and cw.stage == 0
    cw.loss(torch.tensor([0.1, 0.0]), points)  # w_1 = exp(-0.01·0.01) > 0.99
    cw.advance_on_device()
    assert cw.epsilon == 0.1 and float(cw.epsilon_like(points)) == pytest.approx(0.1)
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


# ---------------------------------------------------------------- uneven chunks and the scaled residual

from lightning_ntk import estimate_ntk_traces, ntk_traces  # noqa: E402
from lightning_ntk.causal import CausalResiduals, chunk_scales  # noqa: E402
from lightning_ntk.estimators.grad_norm import loss_gradients  # noqa: E402

# Four chunks of [0, 1] holding 3, 1, 2 and 4 points.
TIMES = [0.05, 0.1, 0.2, 0.3, 0.55, 0.7, 0.8, 0.85, 0.9, 0.99]
EPS = 3.0


class HeatTerms(nn.Module):
    """u_t − 0.1 u_x on (x, t) points, plus an initial-condition term; the ordinary autograd style."""

    terms = ("ic", "pde")

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def residuals(self, batch):
        x = batch["pde"].clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        return {
            "ic": self.net(batch["ic"])[:, 0] - 1.0,
            "pde": du[:, 1] - 0.1 * du[:, 0] + u[:, 0] - torch.cos(4 * x[:, 1]),
        }

    def residual_points(self, batch):
        return {"pde": batch["pde"]}


def heat_batch():
    g = torch.Generator().manual_seed(5)
    pde = torch.stack([torch.rand(10, generator=g, dtype=torch.float64), torch.tensor(TIMES, dtype=torch.float64)], 1)
    ic = torch.stack([torch.rand(4, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)], 1)
    return {"ic": ic, "pde": pde}


def by_hand(model, batch, num_chunks=4, eps=EPS):
    """Chunk members, chunk losses L_k, weights w_k (j < k) and the raw per-point NTK norms, all from
    loops over points."""
    r = model.residuals(batch)["pde"].detach()
    members = [
        [n for n, t in enumerate(TIMES) if min(int(t * num_chunks), num_chunks - 1) == k] for k in range(num_chunks)
    ]
    losses = [sum(float(r[n]) ** 2 for n in m) / len(m) for m in members]
    weights = [math.exp(-eps * sum(losses[:k])) for k in range(num_chunks)]
    norms = reference_point_norms(model, batch)["pde"]
    return members, losses, weights, norms


def jax_pi_trace(members, weights, norms):
    """N · mean_k(w_k · mean_{n∈k} K_nn)."""
    n = sum(len(m) for m in members)
    return (
        n
        * sum(w * sum(float(norms[i]) for i in m) / len(m) for w, m in zip(weights, members, strict=True))
        / len(members)
    )


def test_uneven_chunks_give_jax_pis_mean_of_chunk_means_and_the_loss_is_the_scaled_mean_square():
    torch.manual_seed(3)
    model, batch = HeatTerms(), heat_batch()
    members, losses, weights, norms = by_hand(model, batch)
    assert [len(m) for m in members] == [3, 1, 2, 4]
    assert max(weights) / min(weights) > 2  # the causal trace is far from the plain one
    cw = CausalWeighting(time_column=1, num_chunks=4, epsilon=EPS)
    r = model.residuals(batch)["pde"]
    got = causal_trace(norms, *cw.weights(r, batch["pde"]))
    assert float(got) == pytest.approx(jax_pi_trace(members, weights, norms), rel=1e-12)
    want_loss = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / 4
    assert float(cw.loss(r, batch["pde"])) == pytest.approx(want_loss, rel=1e-12)
    scaled, w = cw.apply(r, batch["pde"])
    assert float(scaled.square().mean()) == pytest.approx(want_loss, rel=1e-12)
    torch.testing.assert_close(w, torch.tensor(weights, dtype=torch.float64), rtol=1e-13, atol=0)
    assert chunk_scales(torch.tensor([0, 0, 2]), torch.ones(3)).tolist() == [0.5, 0.0, 1.0]  # empty chunk: 0


def _view(model, batch, num_chunks=4):
    return CausalResiduals(model, {"pde": CausalWeighting(time_column=1, num_chunks=num_chunks, epsilon=EPS)}).freeze(
        batch
    )


def test_the_exact_path_measures_the_causal_trace_on_the_gram_path():
    torch.manual_seed(3)
    model, batch = HeatTerms(), heat_batch()
    members, _, weights, norms = by_hand(model, batch)
    estimate = estimate_ntk_traces(_view(model, batch), batch, "exact")
    assert estimate.info["paths"] == {"ic": "gram", "pde": "gram"}
    assert float(estimate.traces["pde"]) == pytest.approx(jax_pi_trace(members, weights, norms), rel=1e-10)
    assert float(estimate.traces["ic"]) == pytest.approx(
        float(reference_point_norms(model, batch)["ic"].sum()), rel=1e-10
    )


@pytest.mark.parametrize(
    "estimator",
    ["subsample", "hutchinson", "hutchpp", "fd"],
)
def test_every_sketch_is_unbiased_for_the_causal_trace(estimator):
    torch.manual_seed(3)
    model, batch = HeatTerms(), heat_batch()
    members, _, weights, norms = by_hand(model, batch)
    want, plain = jax_pi_trace(members, weights, norms), float(norms.sum())
    view = _view(model, batch)
    g = torch.Generator().manual_seed(11)
    draws = torch.stack([ntk_traces(view, batch, estimator, generator=g)["pde"] for _ in range(300)])
    mean, stderr = float(draws.mean()), float(draws.std()) / math.sqrt(len(draws))
    assert abs(mean - want) < 4 * stderr + 1e-6 * want, (mean, want, stderr)
    assert abs(mean - plain) > 4 * stderr  # the plain trace is told apart


def test_grad_norm_through_the_view_is_the_norm_of_the_causal_loss_gradient():
    torch.manual_seed(3)
    model, batch = HeatTerms(), heat_batch()
    members, _, weights, _ = by_hand(model, batch)
    r = model.residuals(batch)["pde"]
    # The causal loss written out with the hand weights as constants.
    loss = sum(w * sum(r[n] ** 2 for n in m) / len(m) for w, m in zip(weights, members, strict=True)) / 4
    grads = torch.autograd.grad(loss, list(model.parameters()))
    want = torch.cat([g.reshape(-1) for g in grads])
    got = loss_gradients(_view(model, batch), batch)["pde"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_the_view_needs_freeze_and_the_points_of_every_causal_term():
    model, batch = HeatTerms(), heat_batch()
    view = CausalResiduals(model, {"pde": CausalWeighting(time_column=1)})
    with pytest.raises(RuntimeError, match="freeze"):
        view.residuals(batch)
    bad = CausalResiduals(model, {"pde": CausalWeighting(time_column=1)}, points=lambda b: {"ic": b["ic"]})
    with pytest.raises(ValueError, match=r"points of the causal term\(s\) \['pde'\]"):
        bad.freeze(batch)
    with pytest.raises(ValueError, match="column 2"):
        CausalResiduals(model, {"pde": CausalWeighting(time_column=2)}).freeze(batch)


def _times(values):
    t = torch.tensor(values, dtype=torch.float64)
    return torch.stack([torch.zeros_like(t), t], 1)


def test_times_in_half_of_the_default_range_warn_once_naming_the_observed_range():
    cw = CausalWeighting(time_column=1, num_chunks=32)
    points = _times(torch.linspace(0, 0.5, 64).tolist())
    with pytest.warns(UserWarning, match=r"15 of 32 chunks .* hold no point \(the points' times lie in \[0, 0.5\]\)"):
        cw.chunks(points)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cw.chunks(points)  # once per object


def test_times_outside_t_range_warn_that_they_go_to_the_end_chunks():
    cw = CausalWeighting(time_column=1, num_chunks=4)
    with pytest.warns(UserWarning, match=r"2 of 6 points lie outside t_range=\(0.0, 1.0\) .*\[-0.2, 1.5\]"):
        chunks = cw.chunks(_times([-0.2, 0.1, 0.4, 0.6, 0.9, 1.5]))
    assert chunks.tolist() == [0, 0, 1, 2, 3, 3]


def test_times_that_fill_the_range_say_nothing():
    cw = CausalWeighting(time_column=1, num_chunks=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cw.chunks(_times(torch.linspace(0, 1, 40).tolist()))


def test_the_schedule_state_is_one_object_of_tensors_with_no_host_copy():
    cw = CausalWeighting(time_column=0, num_chunks=2, epsilon_schedule=[0.5, 1.0, 2.0], advance_at=0.1)
    state = cw.state
    assert [t.dtype for t in (state.stage, state.schedule, state.epsilon)] == [
        torch.int64,
        torch.float64,
        torch.float64,
    ]
    cw.advance_on_device(torch.tensor([1.0, 0.9]))  # moves the tensors in place; nothing on the host to go stale
    assert torch.equal(cw.last_weights, torch.tensor([1.0, 0.9]))
    assert int(state.stage) == 1 and float(state.epsilon) == 1.0 and cw.stage == 1 and cw.epsilon == 1.0
    cw.stage = 2
    assert float(state.epsilon) == 2.0
    assert not {"_stage", "_stage_on_device", "_epsilon_on_device"} & set(vars(cw))

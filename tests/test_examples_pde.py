"""The 2-D, nonlinear and vector-valued examples: reference solvers against known answers, the
examples' residuals at the reference solution, and short runs of every weighting."""

import math

import pytest
import torch
from conftest import reference_traces
from test_examples import EXAMPLES, load

from lightning_ntk import estimate_ntk_traces
from lightning_ntk.memory import memory_of


class Exact(torch.nn.Module):
    """Stands in for the network: the closed-form solution, shaped like the network's output."""

    def __init__(self, fn, outputs: int = 1):
        super().__init__()
        self.fn, self.scale = fn, torch.nn.Parameter(torch.ones(()))
        self.outputs = outputs

    def forward(self, x):
        out = self.fn(x) * self.scale
        return out.unsqueeze(-1) if out.ndim == 1 else out


def test_helmholtz_exact_solution_has_zero_residuals():
    ex = load("helmholtz_2d")
    model = ex.Helmholtz2D(width=8, depth=1).double()
    model.net = Exact(ex.exact_solution)
    batch = {k: v.double() for k, v in ex.sample_points(torch.Generator().manual_seed(0), 16, 64).items()}
    res = model.residuals(batch)
    q_max = float(ex.source(batch["pde"]).abs().max())
    assert q_max > 100  # (k² − π² − 16π²) ≈ −166: the residual's terms are large
    assert float(res["pde"].abs().max()) < 1e-10 * q_max
    assert float(res["bc"].abs().max()) < 1e-12
    # A wrong source (sign of k² flipped) is caught.
    assert float((res["pde"] - 2 * ex.K**2 * model.u(batch["pde"])).abs().max()) > 1e-3


def test_cole_hopf_reproduces_the_known_steepest_slope_and_the_initial_state():
    ex = load("burgers_1d")
    h = 1e-7
    u = ex.cole_hopf(torch.tensor([-h, h]), torch.full((2,), 1.6037 / math.pi))
    assert float((u[1] - u[0]) / (2 * h)) == pytest.approx(-152.00516, rel=2e-6)  # Basdevant et al. 1986
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    torch.testing.assert_close(ex.cole_hopf(x, torch.zeros(9)), -torch.sin(math.pi * x), rtol=0, atol=1e-12)


def test_burgers_reference_satisfies_the_pde():
    ex = load("burgers_1d")
    x = torch.tensor([-0.7, -0.4, 0.3, 0.6], dtype=torch.float64).repeat(3)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64).repeat_interleave(4)
    h = 1e-4

    def u(dx=0.0, dt=0.0):
        return ex.cole_hopf(x + dx, t + dt)

    u_t = (u(dt=h) - u(dt=-h)) / (2 * h)
    u_x = (u(dx=h) - u(dx=-h)) / (2 * h)
    u_xx = (u(dx=h) - 2 * u() + u(dx=-h)) / h**2
    residual = u_t + u() * u_x - ex.NU * u_xx
    assert float(residual.abs().max()) < 1e-5 * float(u_x.abs().max())
    assert float((u_t + u_x).abs().max()) > 1e-2  # the check can fail: a wrong PDE is far off


def test_burgers_network_residual_at_the_reference_is_small():
    ex = load("burgers_1d")
    model = ex.Burgers1D(width=8, depth=1).double()
    model.net = Exact(lambda xt: ex.cole_hopf(xt[:, 0], xt[:, 1]))
    batch = {k: v.double() for k, v in ex.sample_points(torch.Generator().manual_seed(1), 8, 8, 8).items()}
    # cole_hopf is built from torch ops, so autograd differentiates the exact solution itself.
    res = model.residuals(batch)
    assert float(res["ic"].abs().max()) < 1e-10 and float(res["bc"].abs().max()) < 1e-10
    assert float(res["pde"].abs().max()) < 1e-6


def test_etdrk4_matches_the_closed_form_for_a_constant_state_and_is_converged():
    ex = load("allen_cahn_1d")
    c, n = 0.3, 32
    states = ex.etdrk4(torch.full((n,), c, dtype=torch.float64), 1.0, 1e-3, save_every=100)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    exact = c * torch.exp(5 * t) / torch.sqrt(1 + c * c * (torch.exp(10 * t) - 1))  # u' = 5u − 5u³
    torch.testing.assert_close(states[:, 0], exact, rtol=0, atol=1e-9)
    x = -1 + 2 * torch.arange(128, dtype=torch.float64) / 128
    a = ex.etdrk4(ex.initial_state(x), 0.2, 1e-3, save_every=200)[-1]
    b = ex.etdrk4(ex.initial_state(x), 0.2, 5e-4, save_every=400)[-1]
    assert float((a - b).abs().max()) < 1e-9


def test_etdrk4_solution_satisfies_allen_cahn():
    ex = load("allen_cahn_1d")
    n, dt = 256, 1e-4
    x = -1 + 2 * torch.arange(n, dtype=torch.float64) / n
    states = ex.etdrk4(ex.initial_state(x), 0.3, dt)
    u_prev, u, u_next = states[-3], states[-2], states[-1]
    k = torch.fft.rfftfreq(n, d=2.0 / n, dtype=torch.float64) * 2 * math.pi
    u_xx = torch.fft.irfft(-k.square() * torch.fft.rfft(u), n)
    residual = (u_next - u_prev) / (2 * dt) - ex.EPS * u_xx - 5 * u + 5 * u.pow(3)
    assert float(residual.abs().max()) < 1e-5
    assert float(((u_next - u_prev) / (2 * dt)).abs().max()) > 0.1  # u changes: the check has teeth


def test_allen_cahn_network_residuals_at_the_reference_state_vanish_for_the_ode_case():
    # With a spatially constant state the PDE reduces to u' = 5u − 5u³; feed its closed form through
    # the example's two-field residuals (v = u_x = 0).
    ex = load("allen_cahn_1d")
    model = ex.AllenCahn1D(width=8, depth=1).double()
    c = 0.3

    def fields(xt):
        t = xt[:, 1]
        u = c * torch.exp(5 * t) / torch.sqrt(1 + c * c * (torch.exp(10 * t) - 1)) + 0 * xt[:, 0]
        return torch.stack([u, torch.zeros_like(u)], dim=1)

    model.net = Exact(fields)
    batch = {k: v.double() for k, v in ex.sample_points(torch.Generator().manual_seed(2), 8, 8, 16).items()}
    res = model.residuals(batch)
    for name in ("periodic", "pde", "flux"):
        assert float(res[name].abs().max()) < 1e-10, name
    assert res["periodic"].shape == (8, 2)  # two rows per boundary point: u and v


@pytest.mark.parametrize("name", ["helmholtz_2d", "burgers_1d", "allen_cahn_1d", "qtensor_2d"])
def test_every_weighting_runs_and_reports(name, tmp_path, capsys):
    ex = load(name)
    results = ex.compare_main(["--steps", "4", "--update-every", "2", "--report-every", "2", "--logdir", str(tmp_path)])
    assert set(results) == {"plain", "ntk", "ntk_fd", "grad_norm"}
    assert all(math.isfinite(err) for err, _, _ in results.values())
    out = capsys.readouterr().out
    assert "grad-norm weights" in out and "NTK weights (exact)" in out
    assert results["plain"][2] == dict.fromkeys(results["plain"][2], 1.0)
    assert results["ntk"][2] != results["plain"][2]
    for run in results:
        assert list((tmp_path / name / run).glob("events.out.tfevents.*"))
    assert (EXAMPLES / "configs" / f"{name}_ntk.yaml").is_file()


FEATURES = [[], ["fourier"], ["rwf"], ["modified"], ["fourier", "rwf", "modified"]]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "+".join(f) or "none")
@pytest.mark.parametrize("name", ["allen_cahn_1d", "burgers_1d"])
def test_the_jax_pi_networks_take_the_gram_path_exactly(name, features):
    # Allen–Cahn's network always has the periodic embedding of x; Burgers' never.
    ex = load(name)
    torch.manual_seed(0)
    model_class = ex.AllenCahn1D if name == "allen_cahn_1d" else ex.Burgers1D
    model = model_class(width=6, depth=2, features=features, fourier_scale=2.0).double()
    batch = {k: v.double() for k, v in ex.sample_points(torch.Generator().manual_seed(1), 4, 3, 6).items()}
    want = reference_traces(model, batch)
    for _ in range(2):  # the first call confirms the layouts, the second takes the warm path
        estimate = estimate_ntk_traces(model, batch, "exact")
        assert set(estimate.info["paths"].values()) == {"gram"}
        for term, trace in estimate.traces.items():
            assert float(trace) == pytest.approx(float(want[term]), rel=1e-10), term


@pytest.mark.parametrize("name", ["burgers_1d", "allen_cahn_1d", "qtensor_2d"])
def test_causal_runs_with_the_jax_pi_network_run_and_report(name, tmp_path, capsys):
    ex = load(name)
    runs = ["ntk+causal", "ntk_fd+causal", "grad_norm+causal"]
    args = ["--steps", "3", "--update-every", "2", "--report-every", "2", "--logdir", str(tmp_path), "--width", "8"]
    results = ex.compare_main(
        [*args, "--depth", "2", "--causal-chunks", "4", "--features", "fourier", "rwf", "modified", "--runs", *runs]
    )
    assert set(results) == set(runs)
    assert all(math.isfinite(err) for err, _, _ in results.values())
    out = capsys.readouterr().out
    assert "NTK weights (exact) + causal" in out and "causal pde: min w=" in out


# ---------------------------------------------------------------- the Q-tensor gradient flow


def _square(m: int):
    s = torch.arange(m, dtype=torch.float64) / m
    return torch.meshgrid(s, s, indexing="ij")


def test_qtensor_etdrk4_matches_the_closed_form_without_the_cubic_term():
    ex = load("qtensor_2d")
    gx, gy = _square(32)
    pq0 = ex.initial_state(gx, gy)  # every mode has |k| = 2π
    states = ex.etdrk4_2d(pq0, 1.0, 1e-2, c=0.0, save_every=50)
    for t, state in zip((0.0, 0.5, 1.0), states, strict=True):
        rate = ex.L_ELASTIC * (2 * math.pi) ** 2 + ex.A
        torch.testing.assert_close(state, pq0 * math.exp(-rate * t), rtol=0, atol=1e-12)
    # A mode of another wave number decays at its own rate (the Laplacian's scaling is checked).
    mode = torch.stack([torch.cos(6 * math.pi * gx) * torch.sin(4 * math.pi * gy), torch.zeros_like(gx)], -1)
    last = ex.etdrk4_2d(mode, 0.5, 1e-2, c=0.0, save_every=50)[-1]
    rate = ex.L_ELASTIC * (36 + 16) * math.pi**2 + ex.A
    torch.testing.assert_close(last, mode * math.exp(-rate * 0.5), rtol=0, atol=1e-12)


def test_qtensor_reference_is_converged_in_time_step_and_modes():
    ex = load("qtensor_2d")
    a = ex.etdrk4_2d(ex.initial_state(*_square(64)), 1.0, 2e-3, save_every=500)[-1]
    b = ex.etdrk4_2d(ex.initial_state(*_square(64)), 1.0, 1e-3, save_every=1000)[-1]
    c = ex.etdrk4_2d(ex.initial_state(*_square(128)), 1.0, 2e-3, save_every=500)[-1][::2, ::2]
    assert float((a - b).abs().max()) < 1e-9
    assert float((a - c).abs().max()) < 1e-9
    assert float((a - ex.initial_state(*_square(64))).abs().max()) > 0.1  # it evolves


def test_qtensor_reference_satisfies_the_pde():
    ex = load("qtensor_2d")
    m, dt = 64, 1e-4
    states = ex.etdrk4_2d(ex.initial_state(*_square(m)), 0.3, dt)
    prev, now, nxt = states[-3], states[-2], states[-1]
    k = torch.fft.fftfreq(m, d=1.0 / m, dtype=torch.float64) * 2 * math.pi
    k2 = (k[:, None] ** 2 + k[None, :] ** 2)[..., None]
    lap = torch.fft.ifft2(-k2 * torch.fft.fft2(now, dim=(0, 1)), dim=(0, 1)).real
    rhs = ex.L_ELASTIC * lap - ex.A * now - 2 * ex.C * now.square().sum(-1, keepdim=True) * now
    d_t = (nxt - prev) / (2 * dt)
    assert float((d_t - rhs).abs().max()) < 1e-6
    assert float(d_t.abs().max()) > 0.1  # it changes: the check has teeth


def test_qtensor_network_residuals_vanish_for_the_spatially_constant_solution():
    # A state constant in space keeps its direction; its order r solves r' = −a r − 2c r³.
    ex = load("qtensor_2d")
    model = ex.QTensor2D(width=8, depth=1).double()
    alpha, beta, r0, angle = -ex.A, 2 * ex.C, 0.3, 0.7

    def fields(xyt):
        e = torch.exp(2 * alpha * xyt[:, 2])
        r = torch.sqrt(alpha * r0**2 * e / (alpha + beta * r0**2 * (e - 1))) + 0 * xyt[:, 0] * xyt[:, 1]
        return torch.stack([r * math.cos(angle), r * math.sin(angle)], dim=1)

    model.net = Exact(fields)
    batch = {k: v.double() for k, v in ex.sample_points(torch.Generator().manual_seed(3), 6, 0, 10).items()}
    res = model.residuals(batch)
    assert res["pde"].shape == (10, 2) and res["ic"].shape == (6, 2)
    assert float(res["pde"].abs().max()) < 1e-10
    # The residual has teeth: the wrong sign of the cubic term would leave ≈ 4c r³ in every row.
    wrong = res["pde"] - 4 * ex.C * fields(batch["pde"]).square().sum(1, keepdim=True) * fields(batch["pde"])
    assert float(wrong.abs().max()) > 1e-3


def test_qtensor_exact_traces_take_the_gram_path_and_equal_a_per_entry_loop():
    ex = load("qtensor_2d")
    torch.manual_seed(0)
    model = ex.QTensor2D(width=6, depth=2).double()
    batch = {k: v.double() for k, v in ex.sample_points(torch.Generator().manual_seed(1), 4, 0, 7).items()}
    want = reference_traces(model, batch)
    for _ in range(2):  # the first call confirms the layouts, the second takes the warm path
        estimate = estimate_ntk_traces(model, batch, "exact")
        assert set(estimate.info["paths"].values()) == {"gram"}
        for term, trace in estimate.traces.items():
            assert float(trace) == pytest.approx(float(want[term]), rel=1e-10), term
    # The pde rows are stacked per component: each component's backward is cut at the other's row.
    (entry,) = [e.gram for e in memory_of(model).exact.values()]
    assert sorted(c for _, c in entry.cuts) == [0, 1]


def test_qtensor_network_residuals_vanish_for_the_closed_form_without_the_cubic_term(monkeypatch):
    # With c = 0 the initial state's modes decay as exp(−(L|k|² + a) t): this checks the Laplacian
    # and the time derivative of the residual, which a spatially constant state cannot.
    ex = load("qtensor_2d")
    monkeypatch.setattr(ex, "C", 0.0)
    model = ex.QTensor2D(width=8, depth=1).double()
    rate = ex.L_ELASTIC * (2 * math.pi) ** 2 + ex.A
    model.net = Exact(lambda xyt: ex.initial_state(xyt[:, 0], xyt[:, 1]) * torch.exp(-rate * xyt[:, 2:3]))
    batch = {k: v.double() for k, v in ex.sample_points(torch.Generator().manual_seed(4), 6, 0, 10).items()}
    res = model.residuals(batch)
    assert float(res["pde"].abs().max()) < 1e-10 and float(res["ic"].abs().max()) < 1e-12
    monkeypatch.setattr(ex, "L_ELASTIC", 2 * ex.L_ELASTIC)  # a wrong elastic constant shows
    assert float(model.residuals(batch)["pde"].abs().max()) > 1e-3


def test_fixed_points_train_on_one_set_and_fresh_points_draw_the_same_sequence_as_before():
    ex = load("burgers_1d")
    fresh = iter(ex.BurgersData(4, 2, 6, seed=3).train_dataloader())
    fixed = iter(ex.BurgersData(4, 2, 6, seed=3, fixed=True).train_dataloader())
    g = torch.Generator().manual_seed(3)
    by_hand = [ex.sample_points(g, 4, 2, 6) for _ in range(3)]  # what the stream drew before `fixed`
    f0 = next(fixed)
    for want in by_hand:
        got = next(fresh)
        assert all(torch.equal(got[k], want[k]) for k in want)
        again = next(fixed)
        assert all(torch.equal(again[k], f0[k]) for k in f0)
    assert all(torch.equal(f0[k], by_hand[0][k]) for k in f0)


@pytest.mark.parametrize("name", ["kovasznay_2d", "poisson_2d"])
def test_the_gauss_newton_examples_closed_forms_have_zero_residuals(name):
    ex = load(name)
    model = (ex.Kovasznay if name == "kovasznay_2d" else ex.Poisson2D)(width=8, depth=1).double()
    model.net = Exact(ex.exact_solution)
    batch = ex.sample_points(torch.Generator().manual_seed(0), interior=64, boundary=16)
    residuals = model.residuals(batch)
    for term, r in residuals.items():
        assert float(r.abs().max()) < 1e-10, term
    # A scaled solution is not a solution: the nonlinear (and the inhomogeneous) terms see it; a scaled
    # velocity is still divergence-free.
    model.net.scale.data.fill_(1.01)
    perturbed = model.residuals(batch)
    for term in ("mom_x", "mom_y") if name == "kovasznay_2d" else ("pde",):
        assert float(perturbed[term].abs().max()) > 1e-4, term

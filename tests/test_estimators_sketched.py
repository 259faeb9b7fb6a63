"""Statistical tests of the randomized trace estimators (fixed seeds, float64, tiny models)."""

import warnings

import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, TwoFieldModel, poisson_batch, reference_traces

from lightning_ntk import estimate_ntk_traces
from lightning_ntk.products import JacobianProducts

SKETCHES = {
    "subsample": {"num_points": 8},
    "hutchinson": {"num_probes": 4},
    "hutchpp": {"num_probes": 6},
    "fd": {"num_probes": 2},
}


@pytest.fixture(scope="module")
def setup():
    # The ordinary autograd-style residual: the statistics do not depend on the style, and it is the
    # cheapest to evaluate hundreds of times (the helpers style is covered below).
    torch.manual_seed(7)
    model = AutogradPoisson().double()
    batch = poisson_batch(n_r=40)
    return model, batch, reference_traces(model, batch)


def draws(model, batch, name, repeats, seed=0, **options):
    if name == "subsample" and "num_probes" in options:  # its "probes" are points
        options["num_points"] = options.pop("num_probes")
    g = torch.Generator().manual_seed(seed)
    out = {"bc": [], "pde": []}
    errs = {"bc": [], "pde": []}
    for _ in range(repeats):
        est = estimate_ntk_traces(model, batch, name, generator=g, **options)
        for term in out:
            out[term].append(float(est.traces[term]))
            errs[term].append(float(est.stderr[term]))
    return {t: torch.tensor(v, dtype=torch.float64) for t, v in out.items()}, {
        t: torch.tensor(v, dtype=torch.float64) for t, v in errs.items()
    }


@pytest.mark.parametrize("name", list(SKETCHES))
def test_unbiased_mean_within_a_few_standard_errors(setup, name):
    model, batch, exact = setup
    values, _ = draws(model, batch, name, 150, **SKETCHES[name])
    for term in ("bc", "pde"):
        v = values[term]
        se = v.std() / len(v) ** 0.5
        gap = abs(float(v.mean()) - float(exact[term]))
        # bc has 2 points: subsample and hutchpp are exact there, so their spread is zero.
        assert gap <= 4 * float(se) + 1e-9 * float(exact[term]), (term, gap, float(se))


@pytest.mark.parametrize("name", list(SKETCHES))
def test_error_shrinks_with_more_probes(setup, name):
    model, batch, exact = setup
    few, _ = draws(model, batch, name, 30, seed=1, num_probes=2 if name != "hutchpp" else 3)
    many, _ = draws(model, batch, name, 30, seed=2, num_probes=16)  # 8× the probes: error ~2.8× smaller
    rel = lambda v: float(((v - exact["pde"]) / exact["pde"]).abs().mean())  # noqa: E731
    assert rel(many["pde"]) < 0.5 * rel(few["pde"])


@pytest.mark.parametrize("name, probes", [("hutchinson", 8), ("fd", 4), ("subsample", 10)])
def test_reported_standard_error_matches_observed_spread(setup, name, probes):
    model, batch, _ = setup
    values, errors = draws(model, batch, name, 150, seed=3, num_probes=probes)
    observed = float(values["pde"].std())
    reported = float(errors["pde"].pow(2).mean().sqrt())
    assert 0.6 < reported / observed < 1.5, (reported, observed)


def test_hutchpp_standard_error_is_conditional_on_the_sketch(setup):
    # Documented: Hutch++ reports the spread of its Hutchinson correction given Q, which leaves out
    # the variation of the sketched part; with k = 2 it understates the total spread, but not by 4x.
    model, batch, _ = setup
    values, errors = draws(model, batch, "hutchpp", 150, seed=3, num_probes=6)
    ratio = float(errors["pde"].pow(2).mean().sqrt()) / float(values["pde"].std())
    assert 0.25 < ratio < 1.5


def test_fd_bias_falls_fourfold_when_h_halves():
    model = HelperPoisson().double()
    batch = poisson_batch(n_r=20)
    products = JacobianProducts(model, batch)
    params = products.params
    errors = []
    for h in (4e-2, 2e-2, 1e-2):
        g = torch.Generator().manual_seed(11)
        est = estimate_ntk_traces(model, batch, "fd", num_probes=1, generator=g, step_size=h)
        # The same seed gives the same direction z: rebuild it and take ‖J z‖² exactly.
        g = torch.Generator().manual_seed(11)
        z = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in params]
        exact_jz = float(products.jvp("pde", z).square().sum())
        errors.append(abs(float(est.traces["pde"]) - exact_jz))
    assert 3.5 < errors[0] / errors[1] < 4.5
    assert 3.5 < errors[1] / errors[2] < 4.5


@pytest.mark.parametrize("name", [*SKETCHES, "auto", "exact"])
def test_parameters_bit_identical_and_grad_untouched(name):
    model = HelperPoisson()
    before = [p.detach().clone() for p in model.parameters()]
    estimate_ntk_traces(model, poisson_batch(dtype=torch.float32), name, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_fd_leaves_parameters_intact_when_the_residual_raises():
    class Flaky(HelperPoisson):
        calls = 0

        def residuals(self, batch):
            Flaky.calls += 1
            if Flaky.calls == 2:  # the second evaluation runs at θ − h z
                raise RuntimeError("boom")
            return super().residuals(batch)

    model = Flaky()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        estimate_ntk_traces(model, poisson_batch(dtype=torch.float32), "fd")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("cls", [HelperPoisson, AutogradPoisson])
def test_hutchpp_is_exact_when_its_sketch_spans_the_block(cls):
    # k = num_probes // 3 ≥ N: the range finder sees all of K_ii, so the result is exact. This checks
    # the NTK-vector products (VJP + double-backward JVP) for both residual styles.
    model = cls().double()
    batch = poisson_batch(n_r=5)
    est = estimate_ntk_traces(model, batch, "hutchpp", num_probes=15)
    exact = reference_traces(model, batch)
    for term in exact:
        torch.testing.assert_close(est.traces[term], exact[term], rtol=1e-10, atol=0)
        assert float(est.stderr[term]) == 0.0


@pytest.mark.parametrize("name", list(SKETCHES))
def test_sketches_work_with_helper_style_residuals(name):
    model = HelperPoisson().double()
    batch = poisson_batch(n_r=10)
    exact = reference_traces(model, batch)
    values, _ = draws(model, batch, name, 40, seed=5, num_probes=8)
    mean = float(values["pde"].mean())
    assert mean == pytest.approx(float(exact["pde"]), rel=0.15)


def test_seeded_generators_reproduce():
    model = HelperPoisson().double()
    batch = poisson_batch()
    for name in SKETCHES:
        a = estimate_ntk_traces(model, batch, name, generator=torch.Generator().manual_seed(3), **SKETCHES[name])
        b = estimate_ntk_traces(model, batch, name, generator=torch.Generator().manual_seed(3), **SKETCHES[name])
        assert all(torch.equal(a.traces[t], b.traces[t]) for t in a.traces)


class CentredPoisson(HelperPoisson):
    """Rows that mix points (mean-centred): the Gram path does not apply."""

    def residuals(self, batch):
        out = super().residuals(batch)
        return {"bc": out["bc"], "pde": out["pde"] - out["pde"].mean()}


def test_auto_is_exact_where_the_gram_path_applies_and_chooses_by_work_elsewhere():
    batch = poisson_batch()
    seeded = {"generator": torch.Generator().manual_seed(0)}
    cheap = estimate_ntk_traces(HelperPoisson().double(), batch, "auto", max_exact_work=10.0, **seeded)
    assert cheap.info["chosen"] == "exact" and set(cheap.info["paths"].values()) == {"gram"}
    model = CentredPoisson().double()
    with pytest.warns(UserWarning, match="Gram path"):
        assert estimate_ntk_traces(model, batch, "auto").info["chosen"] == "exact"
    assert estimate_ntk_traces(model, batch, "auto", max_exact_work=10.0, **seeded).info["chosen"] == "hutchpp"


@pytest.mark.parametrize("name", list(SKETCHES))
@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_bad_num_probes(name, bad):
    with pytest.raises(ValueError, match="num_probes"):
        estimate_ntk_traces(HelperPoisson(), poisson_batch(dtype=torch.float32), name, num_probes=bad)


def test_fd_points_per_probe_is_unbiased_and_reports_full_row_counts(setup):
    model, batch, exact = setup
    values, _ = draws(model, batch, "fd", 200, seed=8, num_probes=2, points_per_probe=10)
    for term in ("bc", "pde"):
        v = values[term]
        assert abs(float(v.mean()) - float(exact[term])) <= 4 * float(v.std() / len(v) ** 0.5)
    est = estimate_ntk_traces(model, batch, "fd", points_per_probe=10)
    assert est.num_rows == {"bc": 2, "pde": 40}


def test_fd_points_per_probe_row_counts_are_exact_integers():
    # 11 of 15 points per probe: 11 * (15 / 11) is 14.999... in floating point, and must still be 15.
    two_field = TwoFieldModel().double()
    g = torch.Generator().manual_seed(4)
    batch = (torch.rand(3, 2, generator=g, dtype=torch.float64), torch.rand(15, 2, generator=g, dtype=torch.float64))
    est = estimate_ntk_traces(two_field, batch, "fd", points_per_probe=11, generator=g)
    assert est.num_rows == {"data": 6, "pde": 30}
    est = estimate_ntk_traces(HelperPoisson().double(), poisson_batch(n_r=15), "fd", points_per_probe=11)
    assert est.num_rows == {"bc": 2, "pde": 15}


def test_fd_points_per_probe_checks_the_layout_once_and_rejects_non_pointwise_residuals():
    class Counting(HelperPoisson):
        calls = 0

        def residuals(self, batch):
            Counting.calls += 1
            return super().residuals(batch)

    model = Counting().double()
    batch = poisson_batch(n_r=30)
    estimate_ntk_traces(model, batch, "fd", points_per_probe=8)
    assert Counting.calls == 4  # layout check (full + subset) once, then two per probe
    estimate_ntk_traces(model, batch, "fd", points_per_probe=8)
    assert Counting.calls == 6

    class NotPointwise(HelperPoisson):
        def residuals(self, batch):
            out = super().residuals(batch)
            return {"bc": out["bc"], "pde": out["pde"] - out["pde"].mean()}

    with pytest.raises(ValueError, match=r"term 'pde'.*points_per_probe=None"):
        estimate_ntk_traces(NotPointwise().double(), batch, "fd", points_per_probe=8)


def test_auto_points_per_probe_is_a_sixteenth_but_at_least_64():
    from lightning_ntk.estimators.finite_difference import auto_points_per_probe

    sizes = (10, 64, 100, 1024, 1025, 2000, 4096)
    assert [auto_points_per_probe(n) for n in sizes] == [10, 64, 64, 64, 65, 125, 256]


class ShapeRecording(AutogradPoisson):
    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, int]] = []

    def residuals(self, batch):
        out = super().residuals(batch)
        self.rows.append((out["bc"].shape[0], out["pde"].shape[0]))
        return out


def test_fd_auto_subsamples_large_terms_only_and_stays_unbiased():
    torch.manual_seed(3)
    model = ShapeRecording().double()
    batch = poisson_batch(n_r=200)
    exact = reference_traces(model, batch)
    model.rows.clear()
    est = estimate_ntk_traces(model, batch, "fd", generator=torch.Generator().manual_seed(0))
    # Layout check (full batch, then 64 of 200), then one probe: two evaluations on 64 points.
    assert model.rows == [(2, 200), (2, 64), (2, 64), (2, 64)]
    assert est.num_rows == {"bc": 2, "pde": 200}
    values, _ = draws(model, batch, "fd", 300, seed=2)
    for term in ("bc", "pde"):
        v = values[term]
        assert abs(float(v.mean()) - float(exact[term])) <= 4 * float(v.std() / len(v) ** 0.5)

    small = ShapeRecording().double()
    estimate_ntk_traces(small, poisson_batch(n_r=40), "fd")
    assert small.rows == [(2, 40), (2, 40)]  # every term within 64 points: no check, no subsampling


def test_fd_auto_falls_back_to_every_point_for_non_pointwise_residuals_with_one_warning():
    class NotPointwise(ShapeRecording):
        def residuals(self, batch):
            out = super().residuals(batch)
            return {"bc": out["bc"], "pde": out["pde"] - out["pde"].mean()}

    model = NotPointwise().double()
    batch = poisson_batch(n_r=200)
    with pytest.warns(UserWarning, match=r"term 'pde'.*points_per_probe='auto' evaluates every point"):
        auto = estimate_ntk_traces(model, batch, "fd", generator=torch.Generator().manual_seed(5))
    model.rows.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = estimate_ntk_traces(model, batch, "fd", generator=torch.Generator().manual_seed(5))
    assert model.rows == [(2, 200), (2, 200)]  # no second check, every point
    full = estimate_ntk_traces(model, batch, "fd", points_per_probe=None, generator=torch.Generator().manual_seed(5))
    assert again.traces == full.traces and torch.isfinite(auto.traces["pde"])

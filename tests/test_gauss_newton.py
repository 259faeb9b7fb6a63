"""The Gauss–Newton step against a dense reference built from one ``autograd.grad`` per residual entry.

The reference takes the loss rows ``r̃`` as the loss itself weighs them (term weights, 1/R_i, causal
scales), builds ``J`` entry by entry and solves the *primal* system ``(JᵀJ + μI) Δθ = −Jᵀ r̃`` (P × P), so
neither the push-through identity nor the Gram rows are in the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp, two_field_batch
from torch import nn

from lightning_ntk import CausalWeighting, PINNModule, gauss_newton_direction, gauss_newton_system
from lightning_ntk.contract import trainable_parameters
from lightning_ntk.gauss_newton import symmetric_gram
from lightning_ntk.jacobian.full import residual_jacobian


class MixedTwoOutput(nn.Module):
    """Two outputs (u, v) on 2-D points; the PDE rows use the mixed derivative u_xy and a product of the
    fields; the boundary term is vector-valued (both fields, an (N, 2) residual)."""

    terms = ("pde", "bc")

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(d_in=2, width=6, d_out=2)

    def residuals(self, batch):
        x_b, x_r = batch
        x = x_r.clone().requires_grad_(True)
        u, v = self.net(x).unbind(1)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        u_xy = torch.autograd.grad(du[:, 0].sum(), x, create_graph=True)[0][:, 1]
        return {"pde": torch.stack([u_xy + u * v, du[:, 1] - v], 1), "bc": self.net(x_b) - 1.0}


class WeightedTwoOutput(PINNModule):
    """The same residuals in a PINNModule: term weights (and optionally a causal PDE term)."""

    def __init__(self, causal: dict | None = None) -> None:
        super().__init__(terms=["pde", "bc"], init_weights={"pde": 0.3, "bc": 7.0}, causal=causal)
        self.inner = MixedTwoOutput()

    def residuals(self, batch):
        return self.inner.residuals(batch)

    def residual_points(self, batch):
        return {"pde": batch[1]}


def model(cls, *args):
    torch.manual_seed(0)
    return cls(*args).double()


def loss_rows_by_hand(module, batch) -> torch.Tensor:
    """``r̃`` with its graph, as the module's loss builds it: ‖r̃‖² is the loss."""
    if isinstance(module, PINNModule):
        residuals = module.residuals(batch)
        rows = []
        for i, name in enumerate(module.terms):
            r = residuals[name]
            if name in module.causal:
                r, _ = module.causal[name].apply(r, module.residual_points(batch)[name])
            rows.append(r.reshape(-1) * torch.sqrt(module.ntk_weights[i] / r.numel()))
        return torch.cat(rows)
    residuals = module.residuals(batch)
    return torch.cat([r.reshape(-1) / math.sqrt(r.numel()) for r in residuals.values()])


def dense_reference(module, batch, damping: float) -> dict[str, torch.Tensor]:
    params = trainable_parameters(module)
    r = loss_rows_by_hand(module, batch)
    jac = torch.stack(
        [torch.cat([g.reshape(-1) for g in torch.autograd.grad(r[k], list(params.values()), retain_graph=True)])
         for k in range(r.numel())]
    )  # fmt: skip
    lhs = jac.T @ jac + damping * torch.eye(jac.shape[1], dtype=jac.dtype)
    step = -torch.linalg.solve(lhs, jac.T @ r.detach())
    out, start = {}, 0
    for name, p in params.items():
        out[name] = step[start : start + p.numel()].reshape(p.shape)
        start += p.numel()
    return out


def assert_steps_equal(got: dict, want: dict, rtol: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    flat_got = torch.cat([got[k].reshape(-1) for k in want])
    flat_want = torch.cat([want[k].reshape(-1) for k in want])
    torch.testing.assert_close(flat_got, flat_want, rtol=rtol, atol=rtol * float(flat_want.abs().max()))


@pytest.mark.parametrize("damping", [1e-3, 1.0])
def test_direction_equals_dense_reference_two_outputs_mixed_derivative(damping):
    m, batch = model(MixedTwoOutput), two_field_batch(4, 6)
    got = gauss_newton_direction(m, batch, damping)
    assert_steps_equal(got, dense_reference(m, batch, damping))


def test_direction_with_term_weights_equals_reference():
    m, batch = model(WeightedTwoOutput), two_field_batch(4, 6)
    got = gauss_newton_direction(m, batch, 1e-2)
    assert_steps_equal(got, dense_reference(m, batch, 1e-2))


def test_direction_with_a_causal_term_equals_reference():
    m = model(WeightedTwoOutput, {"pde": CausalWeighting(time_column=1, num_chunks=3, epsilon=5.0)})
    batch = two_field_batch(4, 9)
    got = gauss_newton_direction(m, batch, 1e-2)
    assert_steps_equal(got, dense_reference(m, batch, 1e-2))


def test_system_loss_is_the_modules_loss():
    m = model(WeightedTwoOutput, {"pde": CausalWeighting(time_column=1, num_chunks=3, epsilon=5.0)})
    batch = two_field_batch(4, 9)
    system = gauss_newton_system(m, batch)
    assert system.loss == pytest.approx(float(m.step_losses(batch).total), rel=1e-12)
    assert system.paths == {"pde": "gram", "bc": "gram"}
    assert system.loss_now(batch) == pytest.approx(system.loss, rel=1e-12)


def test_predicted_loss_is_the_linear_models_loss():
    """``‖r̃ + JΔθ‖² = μ²‖α‖²`` (the identity the gain ratio uses), against J applied by hand."""
    m, batch = model(MixedTwoOutput), two_field_batch(4, 6)
    system = gauss_newton_system(m, batch)
    alpha, step = system.solve(0.05)
    linear = system.residual + system.jacobian @ step
    assert system.predicted_loss(alpha, 0.05) == pytest.approx(float(linear.square().sum()), rel=1e-10)


class MixesPoints(nn.Module):
    """A term whose rows mix points (minus their mean): the Gram path cannot take it."""

    terms = ("fit",)

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(d_in=2, width=5, d_out=1)

    def residuals(self, x):
        u = self.net(x).squeeze(-1)
        return {"fit": u - u.mean() + x[:, 0]}


def test_rows_that_mix_points_take_the_rows_path_and_stay_exact():
    m, x = model(MixesPoints), torch.rand(5, 2, dtype=torch.float64)
    with pytest.warns(UserWarning, match="one backward pass per residual entry"):
        jac = residual_jacobian(m, x)
    assert jac.paths == {"fit": "rows"}
    assert_steps_equal(gauss_newton_direction(m, x, 0.1), dense_reference(m, x, 0.1))


def test_gram_rows_equal_autograd_rows_per_entry():
    m, batch = model(MixedTwoOutput), two_field_batch(3, 5)
    for _ in range(2):  # the confirming call, then a warm one (graph walked, not recorded)
        jac = residual_jacobian(m, batch)
        assert jac.paths == {"pde": "gram", "bc": "gram"}
        params = list(jac.params.values())
        for term, r in m.residuals(batch).items():
            flat = r.reshape(-1)
            want = torch.stack(
                [torch.cat([g.reshape(-1) for g in torch.autograd.grad(flat[k], params, retain_graph=True)])
                 for k in range(flat.numel())]
            )  # fmt: skip
            torch.testing.assert_close(jac.jacobians[term], want, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(jac.residuals[term], flat.detach())


# ------------------------------------------------------------------ bad input


def test_nonfinite_residual_names_the_term_and_changes_nothing():
    m = model(MixedTwoOutput)
    x_b, x_r = two_field_batch(4, 6)
    x_b[1, 0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(FloatingPointError, match=r"\['bc'\]"):
        gauss_newton_direction(m, (x_b, x_r), 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))


def test_over_the_memory_bound_says_the_size_and_the_option():
    m, batch = model(MixedTwoOutput), two_field_batch(4, 6)
    with pytest.raises(MemoryError, match=r"20 residual rows .* `max_bytes`"):
        gauss_newton_direction(m, batch, 1e-3, max_bytes=1000)


def test_a_term_that_reaches_no_parameter_is_refused():
    class Constant(MixedTwoOutput):
        terms = ("pde", "bc", "const")

        def residuals(self, batch):
            out = super().residuals(batch)
            return {**out, "const": out["bc"] * 0.0}

    with pytest.raises(ValueError, match=r"\['const'\] reach no trainable parameter"):
        gauss_newton_direction(model(Constant), two_field_batch(4, 6), 1e-3)


def test_an_overridden_term_loss_is_refused():
    class L1(WeightedTwoOutput):
        def term_loss(self, term, residual):
            return residual.abs().mean()

    with pytest.raises(TypeError, match="overrides `term_loss`"):
        gauss_newton_direction(model(L1), two_field_batch(4, 6), 1e-3)


@pytest.mark.parametrize("damping", [0.0, -1.0, float("inf"), float("nan")])
def test_damping_must_be_positive_and_finite(damping):
    with pytest.raises(ValueError, match="`damping` must be a positive finite number"):
        gauss_newton_direction(model(MixedTwoOutput), two_field_batch(4, 6), damping)


@pytest.mark.parametrize(("m", "block_rows"), [(7, 256), (50, 8), (2049, 256)])
def test_symmetric_gram_is_the_gemm_and_exactly_symmetric(m, block_rows):
    jac = torch.randn(m, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    kernel = symmetric_gram(jac, block_rows)
    assert torch.equal(kernel, kernel.T)
    torch.testing.assert_close(kernel, jac @ jac.T, rtol=1e-13, atol=1e-12)


# ------------------------------------------------------------------ the matrix-free route


@pytest.mark.parametrize("causal", [False, True])
def test_matrix_free_step_equals_the_dense_step_to_its_tolerance(causal):
    from lightning_ntk.gauss_newton_matrix_free import matrix_free_system

    cw = {"pde": CausalWeighting(time_column=1, num_chunks=3, epsilon=5.0)} if causal else None
    m, batch = model(WeightedTwoOutput, cw), two_field_batch(4, 9)
    dense = gauss_newton_system(m, batch)
    free = matrix_free_system(m, batch, tolerance=1e-12)
    torch.testing.assert_close(free.residual, dense.residual, rtol=1e-13, atol=0)
    for damping in (1e-2, 1.0):
        alpha_d, step_d = dense.solve(damping)
        alpha_f, step_f = free.solve(damping)
        assert 0 < free.iterations <= free.residual.numel() + 5
        torch.testing.assert_close(step_f, step_d, rtol=1e-8, atol=1e-10 * float(step_d.abs().max()))
        want = dense.predicted_loss(alpha_d, damping)
        assert free.predicted_loss(alpha_f, damping) == pytest.approx(want, rel=1e-8)


def test_matrix_free_products_are_the_jacobians():
    from lightning_ntk.gauss_newton_matrix_free import matrix_free_system

    m, batch = model(MixedTwoOutput), two_field_batch(4, 6)
    dense, free = gauss_newton_system(m, batch), matrix_free_system(m, batch)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(dense.residual.numel(), dtype=torch.float64, generator=g)
    u = torch.randn(dense.jacobian.shape[1], dtype=torch.float64, generator=g)
    torch.testing.assert_close(free.transpose_product(v), dense.jacobian.T @ v, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(free.product(u), dense.jacobian @ u, rtol=1e-12, atol=1e-13)


def test_conjugate_gradients_solves_and_reports_its_remainder():
    from lightning_ntk.gauss_newton_matrix_free import conjugate_gradients

    g = torch.Generator().manual_seed(1)
    a = torch.randn(30, 30, dtype=torch.float64, generator=g)
    spd = a @ a.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, dtype=torch.float64, generator=g)
    x, remainder, iterations = conjugate_gradients(lambda v: spd @ v, b, 1e-12, 500)
    torch.testing.assert_close(x, torch.linalg.solve(spd, b), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(remainder, b - spd @ x, rtol=0, atol=1e-15)
    assert float(remainder.norm()) <= 1e-12 * float(b.norm()) * 10
    _, _, few = conjugate_gradients(lambda v: spd @ v, b, 1e-12, 3)
    assert few == 3 and iterations > 3

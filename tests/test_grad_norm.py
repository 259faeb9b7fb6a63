"""Gradient-norm weighting (not the NTK): gradients against closed forms and a per-term autograd loop."""

import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, poisson_batch, quiet_trainer, repeat_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_ntk import NTKWeightingCallback, WeightRule
from lightning_ntk.estimators.grad_norm import loss_gradients


class Linear(nn.Module):
    """r_a = X w + b − y (mean-square loss), r_b = 3 (X[:2] w + b): gradients in closed form."""

    terms = ("a", "b")

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.25, dtype=torch.float64))

    def residuals(self, batch):
        x, y = batch
        return {"a": x @ self.w + self.b - y, "b": 3 * (x[:2] @ self.w + self.b)}


def test_loss_gradients_equal_the_closed_form():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 2, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    model = Linear()
    grads = loss_gradients(model, (x, y))
    with torch.no_grad():
        r_a = x @ model.w + model.b - y
        r_b = 3 * (x[:2] @ model.w + model.b)
    # d/dθ mean(r²) = 2 mean(r ∂r/∂θ), θ = (w, b)
    want_a = torch.cat([2 * (r_a[:, None] * x).mean(0), (2 * r_a.mean()).reshape(1)])
    want_b = torch.cat([2 * (r_b[:, None] * 3 * x[:2]).mean(0), (2 * 3 * r_b.mean()).reshape(1)])
    torch.testing.assert_close(grads["a"], want_a, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads["b"], want_b, rtol=1e-12, atol=0)
    assert model.w.grad is None and not grads["a"].requires_grad


def per_term_gradient_norms(model, batch) -> dict[str, float]:
    """‖∇θ L_i‖ from one autograd.grad per term on a fresh evaluation (the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {}
    for name in model.terms:
        loss = model.term_loss(name, model.residuals(batch)[name])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[name] = float(torch.sqrt(sum((g.square().sum() for g in grads if g is not None), torch.tensor(0.0))))
    return out


@pytest.mark.parametrize("cls", [HelperPoisson, AutogradPoisson])
def test_callback_grad_norm_weights_balance_the_loss_gradient_norms(tmp_path, cls):
    model = cls().double()
    batch = poisson_batch(n_r=12)
    norms = per_term_gradient_norms(model, batch)
    want = {"bc": (norms["bc"] + norms["pde"]) / norms["bc"], "pde": (norms["bc"] + norms["pde"]) / norms["pde"]}
    ntk = NTKWeightingCallback(update_every_n_steps=1, estimator="grad_norm")
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[ntk])
    trainer.fit(model, repeat_loader(batch, 1))
    assert ntk.last_weights == pytest.approx(want, rel=1e-10)
    assert ntk.last_traces == pytest.approx(norms, rel=1e-10)  # the balanced quantity: gradient norms
    assert ntk.last_estimate.measure == "grad_norm" and ntk.last_estimate.estimator == "grad_norm"
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"grad_norm/bc", "grad_norm/pde", "ntk/weight/bc"} <= scalars and "ntk/trace/bc" not in scalars


def test_grad_norm_differs_from_the_ntk_rule_when_residual_sizes_differ():
    # Scaling the boundary data shifts r_bc and hence ‖∇L_bc‖, but not the NTK block of bc.
    model = Linear()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    small, large = (x, torch.zeros(6, dtype=torch.float64)), (x, 100 * torch.ones(6, dtype=torch.float64))
    from lightning_ntk import ntk_traces

    assert ntk_traces(model, small)["a"] == ntk_traces(model, large)["a"]
    assert loss_gradients(model, large)["a"].norm() > 50 * loss_gradients(model, small)["a"].norm()


def test_grad_norm_is_no_longer_a_weight_rule_and_the_error_says_what_to_use():
    with pytest.raises(ValueError, match=r"estimator='grad_norm'"):
        WeightRule(mode="grad_norm")


def test_grad_norm_estimate_reduces_gradients_not_norms():
    # Two "ranks" with opposite gradients: the global batch's gradient is their mean (zero here),
    # which the norms of the local gradients would not show.
    from lightning_ntk.estimators import GradientNorms

    g = torch.tensor([3.0, -4.0], dtype=torch.float64)
    local = GradientNorms({"a": g.norm()}, {"a": g.new_zeros(())}, {"a": 3}, "grad_norm", gradients={"a": g})
    norms, rows, variances = local.reduce(["a"], lambda t, op: (t + (-t)) / 2 if op == "mean" else 2 * t)
    assert float(norms[0]) == 0.0 and float(rows[0]) == 6.0 and float(variances[0]) == 0.0
    norms, _, _ = local.reduce(["a"], lambda t, op: t)  # one rank
    assert float(norms[0]) == 5.0

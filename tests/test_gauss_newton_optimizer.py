"""NTKGaussNewton: the damping rule, rejected tries, checkpoints, and the Lightning integration."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import quiet_trainer, repeat_loader, two_field_batch
from test_gauss_newton import MixedTwoOutput, WeightedTwoOutput, model

from lightning_ntk import GaussNewtonWarning, NTKGaussNewton, gauss_newton_direction
from lightning_ntk.gauss_newton import GaussNewtonSystem


def params_of(m):
    return {name: p.detach().clone() for name, p in m.named_parameters()}


def test_an_accepted_step_is_the_direction_and_the_damping_follows_the_gain_ratio():
    m, batch = model(MixedTwoOutput), two_field_batch(4, 6)
    before = params_of(m)
    step = gauss_newton_direction(m, batch, 1e-3)
    opt = NTKGaussNewton(m, damping=1e-3, condition_every=1)
    opt.step(batch=batch)
    rec = opt.last
    assert rec.accepted and rec.retries == 0 and rec.damping == 1e-3
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] + step[name], rtol=0, atol=1e-15)
    assert rec.loss_after < rec.loss_before
    shrink = max(1 / 3, 1 - (2 * rec.gain_ratio - 1) ** 3)
    assert opt.damping == pytest.approx(1e-3 * shrink, rel=1e-12)
    assert rec.condition is not None and rec.condition > 1


def test_a_rejected_try_restores_the_parameters_and_doubles_the_damping(monkeypatch):
    m, batch = model(MixedTwoOutput), two_field_batch(4, 6)
    before = params_of(m)
    real = GaussNewtonSystem.loss_now
    calls = []

    def first_fails(self, b):
        calls.append(1)
        return float("inf") if len(calls) == 1 else real(self, b)

    monkeypatch.setattr(GaussNewtonSystem, "loss_now", first_fails)
    opt = NTKGaussNewton(m, damping=1e-3)
    opt.step(batch=batch)
    assert opt.last.retries == 1 and opt.last.damping == 2e-3 and opt.last.accepted
    monkeypatch.setattr(GaussNewtonSystem, "loss_now", real)
    fresh = model(MixedTwoOutput)
    step = gauss_newton_direction(fresh, batch, 2e-3)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] + step[name], rtol=0, atol=1e-15)


def test_no_decrease_within_the_retries_warns_with_the_history_and_changes_nothing(monkeypatch):
    m, batch = model(MixedTwoOutput), two_field_batch(4, 6)
    before = params_of(m)
    monkeypatch.setattr(GaussNewtonSystem, "loss_now", lambda self, b: float("inf"))
    opt = NTKGaussNewton(m, damping=1e-3, max_retries=2)
    with pytest.warns(GaussNewtonWarning, match=r"no decrease in 3 tries \(damping 0.001, 0.002, 0.008\)"):
        opt.step(batch=batch)
    assert not opt.last.accepted and opt.last.retries == 3
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert opt.damping == pytest.approx(1e-3 * 2 * 4 * 8)


def test_the_damping_resumes_from_the_state_dict_bit_exactly():
    batch = two_field_batch(4, 6)
    straight = model(MixedTwoOutput)
    opt = NTKGaussNewton(straight)
    for _ in range(4):
        opt.step(batch=batch)
    resumed = model(MixedTwoOutput)
    first = NTKGaussNewton(resumed)
    for _ in range(2):
        first.step(batch=batch)
    state = first.state_dict()
    second = NTKGaussNewton(resumed)
    second.load_state_dict(state)
    assert second.damping == first.damping
    for _ in range(2):
        second.step(batch=batch)
    assert second.damping == opt.damping
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": 0.0}, "`damping` must be a positive finite number"),
        ({"damping": True}, "`damping` must be a positive finite number"),
        ({"max_retries": -1}, "`max_retries` must be a non-negative int"),
        ({"condition_every": 1.5}, "`condition_every` must be a non-negative int"),
        ({"damping": 1e-20}, r"must lie in \[min_damping, max_damping\]"),
        ({"dtype": torch.float16}, "`dtype` must be torch.float32 or torch.float64"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NTKGaussNewton(model(MixedTwoOutput), **kwargs)


def test_a_module_without_residuals_and_a_captured_step_are_refused():
    with pytest.raises(TypeError, match="has no `residuals"):
        NTKGaussNewton(torch.nn.Linear(1, 1))
    captured = WeightedTwoOutput()
    captured.capture_step = True
    with pytest.raises(ValueError, match="capture_step=False"):
        NTKGaussNewton(captured)


def test_step_without_a_batch_says_how_to_pass_one():
    with pytest.raises(RuntimeError, match=r"step\(batch=\.\.\.\)"):
        NTKGaussNewton(model(MixedTwoOutput)).step()


# ------------------------------------------------------------------ Lightning


class GaussNewtonPINN(WeightedTwoOutput):
    def configure_optimizers(self):
        return NTKGaussNewton(self, damping=1e-2, condition_every=2)


def fit(tmp_path, m, steps, **kwargs):
    trainer = quiet_trainer(tmp_path, max_steps=steps, precision="64-true", **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(m, repeat_loader(two_field_batch(4, 6), steps))
    return trainer


def test_a_trainer_takes_gauss_newton_steps_without_a_backward_and_logs_them(tmp_path):
    m = model(GaussNewtonPINN)
    start = float(m.step_losses(two_field_batch(4, 6)).total.detach())
    direction = gauss_newton_direction(model(GaussNewtonPINN), two_field_batch(4, 6), 1e-2)
    before = params_of(m)
    trainer = fit(tmp_path, m, 1)
    # One step is exactly the direction (the training_step's batch was handed over, nothing else moved θ).
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] + direction[name], rtol=0, atol=1e-15)
    assert all(p.grad is None for p in m.parameters())  # the closure's backward was skipped
    trainer = fit(tmp_path, m, 4)
    metrics = trainer.logged_metrics
    for tag in ("gn/damping", "gn/gain_ratio", "gn/step_norm", "gn/loss_before", "gn/loss_after", "gn/retries"):
        assert tag in metrics, tag
    assert float(metrics["gn/loss_after"]) < start


def test_checkpoint_resume_is_bit_exact(tmp_path):
    straight = model(GaussNewtonPINN)
    fit(tmp_path / "a", straight, 4)
    first = model(GaussNewtonPINN)
    trainer = fit(tmp_path / "b", first, 2)
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = model(GaussNewtonPINN)
    trainer = quiet_trainer(tmp_path / "c", max_steps=4, precision="64-true")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(resumed, repeat_loader(two_field_batch(4, 6), 4), ckpt_path=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters(), strict=True))
    assert trainer.optimizers[0].damping == straight.trainer.optimizers[0].damping


def test_distributed_training_is_refused_at_fit_start(tmp_path, monkeypatch):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    m = model(GaussNewtonPINN)
    optimizer = m.configure_optimizers()
    trainer = quiet_trainer(tmp_path, max_steps=1, precision="64-true")
    m._trainer = trainer
    monkeypatch.setattr(type(trainer), "world_size", property(lambda self: 2))
    monkeypatch.setattr(type(trainer), "optimizers", property(lambda self: [optimizer]))
    with pytest.raises(MisconfigurationException, match="devices=1"):
        m.on_fit_start()


def test_auto_takes_conjugate_gradients_over_the_memory_bound_and_logs_the_iterations():
    batch = two_field_batch(4, 6)
    dense, free = model(MixedTwoOutput), model(MixedTwoOutput)
    NTKGaussNewton(dense, damping=1e-2).step(batch=batch)
    opt = NTKGaussNewton(free, damping=1e-2, max_bytes=1000, cg_tolerance=1e-12)
    opt.step(batch=batch)
    assert opt._routes and set(opt._routes.values()) == {"cg"}
    assert opt.last.cg_iterations > 0 and opt.last.condition is None
    for a, b in zip(dense.parameters(), free.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


def test_with_adaptive_collocation_and_ntk_weights_the_step_solves_the_loss_it_trains(tmp_path):
    """Drawn points, importance weights in the loss, a causal term and NTK weights: the Gauss–Newton
    system's ‖r̃‖² is the training step's loss on that step's batch."""
    import lightning.pytorch as pl
    from test_adaptive_collocation import loader, unit_square
    from test_collocation import Heat

    from lightning_ntk import AdaptiveCollocation, NTKWeightingCallback

    class HeatGN(Heat):
        def configure_optimizers(self):
            return NTKGaussNewton(self, damping=1e-2)

    seen = []

    class Compare(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((float(outputs["loss"]), pl_module._gauss_newton.last.loss_before))

    torch.manual_seed(0)
    model = HeatGN()
    assert model.causal
    callbacks = [AdaptiveCollocation({"pde": unit_square}, pool_factor=4, seed=0), NTKWeightingCallback(1), Compare()]
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=callbacks, precision="64-true")
    trainer.fit(model, loader(5))
    assert len(seen) == 3
    for loss, before in seen:
        assert before == pytest.approx(loss, rel=1e-10)
    assert seen[-1][0] < seen[0][0]


def test_a_float32_solve_warns_and_a_float32_model_does_not():
    with pytest.warns(GaussNewtonWarning, match="Keep dtype=torch.float64"):
        NTKGaussNewton(model(MixedTwoOutput), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NTKGaussNewton(model(MixedTwoOutput).float())


def test_a_later_fit_with_another_optimizer_takes_its_backward_again(tmp_path):
    class Switch(GaussNewtonPINN):
        use_adam = False

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2) if self.use_adam else super().configure_optimizers()

    m = model(Switch)
    fit(tmp_path / "gn", m, 1)
    assert m._gauss_newton is not None
    m.use_adam = True
    before = params_of(m)
    fit(tmp_path / "adam", m, 2)
    assert m._gauss_newton is None
    assert all(p.grad is not None for p in m.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_gradient_accumulation_is_refused_at_fit_start(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2"):
        fit(tmp_path, model(GaussNewtonPINN), 2, accumulate_grad_batches=2)

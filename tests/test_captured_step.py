"""PINNModule(capture_step=True): on a CPU the same code runs eagerly, and trains bit for bit like the
ordinary module, with the callback changing weights mid-run, an LR schedule and a causal ε schedule."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_ntk import CausalWeighting, NTKWeightingCallback, PINNModule


class Heat(PINNModule):
    """``u_t − 0.1 u_x + u − cos 4t`` with an initial condition; the PDE term causal in t."""

    def __init__(self, capture_step: bool, optimizer: str = "adam"):
        cw = CausalWeighting(
            time_column=1, num_chunks=4, epsilon=0.01, epsilon_schedule=[0.01 * k for k in range(1, 30)], advance_at=0.9
        )
        super().__init__(terms=["ic", "pde"], causal={"pde": cw}, capture_step=capture_step)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
        self.optimizer = optimizer

    def residuals(self, batch):
        x = batch["pde"].clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        pde = du[:, 1] - 0.1 * du[:, 0] + u[:, 0] - torch.cos(4 * x[:, 1])
        return {"ic": self.net(batch["ic"])[:, 0] - 1.0, "pde": pde}

    def residual_points(self, batch):
        return {"pde": batch["pde"]}

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=1e-2)
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5), "interval": "step"},
        }


def batches(n: int):
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        pde = torch.rand(16, 2, generator=g, dtype=torch.float64)
        ic = torch.stack([torch.rand(6, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)], 1)
        out.append({"ic": ic, "pde": pde})
    return out


class Nudge(pl.Callback):
    """Sets a weight by hand between steps 2 and 3 (after the NTK update of step 2)."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
        if trainer.global_step == 3:
            pl_module.set_term_weights({"ic": 123.0})


def fit(tmp_path, model, steps=6):
    ntk = NTKWeightingCallback(update_every_n_steps=2, estimator="fd", seed=0)
    nudge = Nudge()
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[ntk, nudge], logger=False)
    trainer.fit(model, torch.utils.data.DataLoader(batches(steps), batch_size=None))
    return trainer, nudge


def test_captured_mode_trains_bit_for_bit_like_the_ordinary_module(tmp_path):
    torch.manual_seed(0)
    plain = Heat(capture_step=False)
    captured = Heat(capture_step=True)
    captured.load_state_dict(plain.state_dict())
    t_plain, n_plain = fit(tmp_path / "a", plain)
    t_capt, n_capt = fit(tmp_path / "b", captured)
    assert t_capt.global_step == t_plain.global_step == 6
    assert not captured.automatic_optimization
    assert n_capt.lrs == n_plain.lrs and n_capt.lrs[0] > n_capt.lrs[-1]  # the StepLR schedule acted
    assert captured.causal["pde"].stage == plain.causal["pde"].stage > 0  # ε moved on
    for (name, a), b in zip(plain.state_dict().items(), captured.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    one_graph = captured._captured_step.calls
    assert len(one_graph) == 1 and len(next(iter(one_graph.values())).entries) == 1


def test_a_weight_changed_between_two_steps_takes_effect(tmp_path):
    torch.manual_seed(0)
    a = Heat(capture_step=True)
    b = copy.deepcopy(a)
    fit(tmp_path / "a", a, steps=4)

    ntk = NTKWeightingCallback(update_every_n_steps=2, estimator="fd", seed=0)
    quiet_trainer(tmp_path / "b", max_steps=4, callbacks=[ntk], logger=False).fit(
        b, torch.utils.data.DataLoader(batches(4), batch_size=None)
    )
    assert a.term_weights["ic"] == 123.0 != b.term_weights["ic"]
    assert not torch.equal(a.net[0].weight, b.net[0].weight)  # step 3 trained with the new weight


@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        ({"accumulate_grad_batches": 2}, "accumulate"),
        ({"gradient_clip_val": 1.0}, "gradient_clip_val"),
    ],
)
def test_what_cannot_be_replayed_is_refused_when_fitting_starts(tmp_path, trainer_kwargs, match):
    model = Heat(capture_step=True)
    trainer = quiet_trainer(tmp_path, max_steps=2, logger=False, **trainer_kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        trainer.fit(model, torch.utils.data.DataLoader(batches(2), batch_size=None))


def test_capture_step_must_be_a_bool():
    with pytest.raises(TypeError, match="capture_step"):
        Heat(capture_step="yes")


def test_a_plateau_schedule_is_refused_when_fitting_starts(tmp_path):
    class Plateau(Heat):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "loss/total"}}

    trainer = quiet_trainer(tmp_path, max_steps=2, logger=False)
    with pytest.raises(MisconfigurationException, match="ReduceLROnPlateau needs a monitored metric"):
        trainer.fit(Plateau(capture_step=True), torch.utils.data.DataLoader(batches(2), batch_size=None))


def test_captured_step_does_not_import_the_module_it_steps():
    # No import circle between module.py and captured_step.py, TYPE_CHECKING imports included: the module
    # hands the step what it needs (step_losses, after_step, before_optimizer_step) explicitly.
    import ast
    from pathlib import Path

    import lightning_ntk.captured_step as captured_step

    tree = ast.parse(Path(captured_step.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "lightning_ntk.module" not in imported and "lightning_ntk" not in imported


def test_a_bad_update_is_judged_before_the_captured_step_moves_the_parameters(tmp_path):
    # The callback registers its validity check with the module at setup; the captured step calls it
    # before the replayed optimizer step, as automatic optimization calls on_before_optimizer_step.
    class Poisoned(Heat):
        def residuals(self, batch):
            out = super().residuals(batch)
            if self.global_step == 2:  # one batch whose ic residual is NaN (its trace too)
                out = {**out, "ic": out["ic"] * torch.nan}
            return out

    model = Poisoned(capture_step=True)
    seen = []

    class Params(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([p.detach().clone() for p in pl_module.parameters()])

    trainer = quiet_trainer(tmp_path, max_steps=4, callbacks=[NTKWeightingCallback(1), Params()], logger=False)
    with pytest.raises(FloatingPointError, match=r"At optimizer step 2: the residual of term 'ic'"):
        trainer.fit(model, torch.utils.data.DataLoader(batches(4), batch_size=None))
    for p, before in zip(model.parameters(), seen[2], strict=True):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)

"""What a new user hit writing a three-output steady-flow PINN from the docs: each rough edge, guarded."""

import os
import sys

import pytest
import torch
from conftest import mlp, quiet_trainer, repeat_loader

from lightning_ntk import NTKWeightingCallback, PINNModule, ntk_traces

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


class Flow(PINNModule):
    """Outputs (u, v, p); a continuity residual u_x + v_y written in one of the ways users write it."""

    def __init__(self, style: str) -> None:
        super().__init__(terms=["bc", "continuity"])
        self.net = mlp(d_in=2, width=6, d_out=3).double()
        self.style = style
        self.save_hyperparameters()  # as the examples do: Lightning then writes hparams (and hp_metric)

    def residuals(self, batch):
        x_b, x_r = batch
        if self.style != "no_requires_grad":
            x_r = x_r.clone().requires_grad_(True)
        uvp = self.net(x_r)
        u_x = torch.autograd.grad(uvp[:, 0].sum(), x_r, create_graph=True)[0][:, 0:1]  # (N, 1)
        v_y = torch.autograd.grad(uvp[:, 1].sum(), x_r, create_graph=True)[0][:, 1]  # (N,)
        if self.style == "broadcast":
            continuity = u_x + v_y  # (N, N): the mistake
        elif self.style == "trailing":
            continuity = (u_x[:, 0] + v_y).reshape(-1, 1, 1)
        else:
            continuity = u_x[:, 0] + v_y
        return {"bc": self.net(x_b)[:, :2], "continuity": continuity}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def flow_batch(n: int = 12):
    g = torch.Generator().manual_seed(0)
    return torch.rand(5, 2, generator=g, dtype=torch.float64), torch.rand(n, 2, generator=g, dtype=torch.float64)


def test_a_broadcast_residual_is_named_at_the_first_call_before_any_weight(tmp_path):
    model = Flow("broadcast")
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[NTKWeightingCallback(1)], logger=False)
    with pytest.raises(ValueError, match=r"term 'continuity' has shape \(12, 12\).*broadcasting an \(12, 1\) tensor"):
        trainer.fit(model, repeat_loader(flow_batch(), 2))
    assert model.term_weights == {"bc": 1.0, "continuity": 1.0}
    with pytest.raises(ValueError, match="broadcasting"):
        ntk_traces(model, flow_batch())


def test_a_two_point_two_component_residual_is_still_accepted():
    # Below the threshold a square residual is a legitimate small system.
    model = Flow("broadcast")
    traces = ntk_traces(model, flow_batch(n=2))
    assert traces["continuity"] > 0


def test_points_without_requires_grad_get_an_error_that_says_what_to_change():
    with pytest.raises(RuntimeError, match=r"requires_grad_\(True\).*lightning_ntk.derivatives"):
        Flow("no_requires_grad").step_losses(flow_batch())


def test_the_lightning_free_core_says_the_same_for_a_plain_module():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(d_in=2, width=6, d_out=1).double()

        def residuals(self, x):
            u_x = torch.autograd.grad(self.net(x).sum(), x, create_graph=True)[0]
            return {"pde": u_x[:, 0]}

    with pytest.raises(RuntimeError, match=r"Plain.residuals\(batch\) takes a derivative .*requires_grad_\(True\)"):
        ntk_traces(Plain(), flow_batch()[1])


def test_trailing_dimensions_are_rows_of_the_point():
    torch.manual_seed(0)
    plain, trailing = Flow("scalar"), Flow("trailing")
    trailing.load_state_dict(plain.state_dict())
    want, got = ntk_traces(plain, flow_batch()), ntk_traces(trailing, flow_batch())
    torch.testing.assert_close(got["continuity"], want["continuity"], rtol=1e-12, atol=0)


def test_the_examples_write_no_hp_metric_placeholder(tmp_path):
    from pinn_runner import make_trainer
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(trainer):
        trainer.fit(Flow("scalar"), repeat_loader(flow_batch(), 2))
        return EventAccumulator(trainer.logger.log_dir).Reload().Tags()["scalars"]

    assert "hp_metric" in scalars(quiet_trainer(tmp_path / "default", max_steps=2))  # Lightning's default
    assert "hp_metric" not in scalars(make_trainer(2, [], str(tmp_path), "flow", "run"))

"""
NTK weights against gradient-norm weights
==========================================

The same callback measuring the NTK traces (``estimator="exact"``) and the loss-gradient norms
(``estimator="grad_norm"``, the JAX-PI default, *not* the NTK) on the quick start's problem: the
boundary weight each rule
chooses over training. The NTK rule depends on the Jacobians only; the gradient-norm rule also on the
sizes of the residuals, so it moves as the terms are fitted.
"""

import logging
import math
import warnings

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import torch

from lightning_ntk import NTKWeightingCallback, PINNModule, WeightRule
from lightning_ntk.derivatives import partial

# Only the package's own output: no Lightning banner lines or tips.
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="lightning")


class Poisson(PINNModule):
    def __init__(self):
        super().__init__(terms=["bc", "pde"])
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def residuals(self, batch):
        x_b, x_r = batch
        return {"bc": self.net(x_b), "pde": partial(self.net, x_r, 0, 0) + math.pi**2 * torch.sin(math.pi * x_r)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class History(pl.Callback):
    def __init__(self):
        self.steps, self.bc = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.bc.append(pl_module.term_weights["bc"])


batch = (torch.tensor([[0.0], [1.0]]), torch.linspace(0, 1, 64).reshape(-1, 1))
for estimator in ("exact", "grad_norm"):
    torch.manual_seed(0)
    history = History()
    ntk = NTKWeightingCallback(update_every_n_steps=50, estimator=estimator, weight_rule=WeightRule(ema=0.5))
    trainer = pl.Trainer(
        max_steps=600, callbacks=[ntk, history], logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(Poisson(), torch.utils.data.DataLoader([batch] * 600, batch_size=None))
    plt.plot(history.steps, history.bc, label=f'estimator="{estimator}"')
plt.yscale("log")
plt.xlabel("optimizer step")
plt.ylabel("weight of the boundary term")
plt.legend()
plt.show()

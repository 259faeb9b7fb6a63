"""
Quick start: NTK weights for a 1-D Poisson PINN
===============================================

``u'' = −π² sin(πx)`` on [0, 1] with ``u(0) = u(1) = 0``. The boundary term's NTK block has a far
smaller trace than the PDE term's, so ``NTKWeightingCallback`` gives it a large weight.
"""

import logging
import math
import warnings

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import torch

from lightning_ntk import NTKWeightingCallback, PINNModule
from lightning_ntk.derivatives import partial

# Only the package's own output: no Lightning banner lines or tips.
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="lightning")


class Poisson(PINNModule):
    def __init__(self):
        super().__init__(terms=["bc", "pde"])
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def residuals(self, batch):  # per-point residuals, one tensor per term
        x_b, x_r = batch
        u_xx = partial(self.net, x_r, 0, 0)
        return {"bc": self.net(x_b), "pde": u_xx + math.pi**2 * torch.sin(math.pi * x_r)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


torch.manual_seed(0)
x_b = torch.tensor([[0.0], [1.0]])
x_r = torch.linspace(0, 1, 64).reshape(-1, 1)
loader = torch.utils.data.DataLoader([(x_b, x_r)] * 1000, batch_size=None)

ntk = NTKWeightingCallback(update_every_n_steps=100)
trainer = pl.Trainer(
    max_steps=1000, callbacks=[ntk], logger=False, enable_progress_bar=False, enable_model_summary=False
)
model = Poisson()
trainer.fit(model, loader)
print("weights:", {k: round(v, 2) for k, v in ntk.last_weights.items()})

# %%
# The prediction against the exact solution.
x = torch.linspace(0, 1, 101).reshape(-1, 1)
with torch.no_grad():
    u = model.net(x)
exact = torch.sin(math.pi * x)
print("relative L2 error:", float((u - exact).norm() / exact.norm()))
plt.plot(x, exact, label="exact")
plt.plot(x, u, "--", label="PINN with NTK weights")
plt.legend()
plt.xlabel("x")
plt.show()

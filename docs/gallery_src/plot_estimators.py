"""
Exact traces and the sketches
=============================

Every estimator of ``Tr K_ii`` on one small PINN with an ordinary autograd-style residual: the exact
value (Gram path), and the error of each sketch over 20 seeded draws.
"""

import math

import matplotlib.pyplot as plt
import torch

from lightning_ntk import FiniteDifference, Hutchinson, HutchPlusPlus, Subsample, estimate_ntk_traces


class Poisson(torch.nn.Module):
    terms = ("bc", "pde")

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )

    def residuals(self, batch):
        x_b, x_r = batch
        x = x_r.clone().requires_grad_(True)
        u_x = torch.autograd.grad(self.net(x).sum(), x, create_graph=True)[0]
        u_xx = torch.autograd.grad(u_x.sum(), x, create_graph=True)[0]
        return {"bc": self.net(x_b), "pde": u_xx + math.pi**2 * torch.sin(math.pi * x_r)}


torch.manual_seed(0)
model = Poisson().double()
batch = (torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.rand(256, 1, dtype=torch.float64))
exact = estimate_ntk_traces(model, batch, "exact")
print("exact traces:", {k: float(v) for k, v in exact.traces.items()}, "paths:", exact.info["paths"])

# %%
# Relative error of the PDE block's trace, 20 draws per estimator.
estimators = {
    "Subsample(32)": Subsample(num_points=32),
    "Hutchinson(16)": Hutchinson(num_probes=16),
    "HutchPlusPlus(16)": HutchPlusPlus(num_probes=16),
    "FiniteDifference(16)": FiniteDifference(num_probes=16),
}
g = torch.Generator().manual_seed(0)
errors = {}
for name, estimator in estimators.items():
    values = torch.stack([estimator(model, batch, g).traces["pde"] for _ in range(20)])
    errors[name] = (values / exact.traces["pde"] - 1).abs()
    print(f"{name:<22} median |error| {float(errors[name].median()):.2%}")
plt.boxplot([e.numpy() for e in errors.values()], tick_labels=list(errors))
plt.yscale("log")
plt.ylabel("|estimate / exact − 1|")
plt.xticks(rotation=15)
plt.tight_layout()
plt.show()

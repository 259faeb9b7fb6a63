"""The benchmark problem shared by the scripts here: a Poisson-type residual plus a boundary term.

``d`` input dimensions (default 1); the residual is the Laplacian of a tanh MLP plus a source.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
from torch import nn

from lightning_ntk import PINNModule
from lightning_ntk.derivatives import partial


def mlp(width: int, depth: int, d: int = 1, d_out: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def source(x: torch.Tensor) -> torch.Tensor:
    return -16 * math.pi**2 * torch.sin(4 * math.pi * x)


class FastPoisson(PINNModule):
    """u_xx - f on residual points and u on boundary-type points, N of each."""

    def __init__(self, width: int = 256, depth: int = 3, lr: float = 1e-3, d: int = 1, **module_options) -> None:
        super().__init__(terms=["bc", "pde"], **module_options)
        self.net = mlp(width, depth, d)
        self.lr = lr
        self.d = d

    def residuals(self, batch):
        x_b, x_r = batch
        lap = sum(partial(self.net, x_r, i, i) for i in range(self.d))
        return {"bc": self.net(x_b), "pde": lap - source(x_r[:, :1])}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class AutogradPoisson(FastPoisson):
    """The same residual in the ordinary autograd style (not vmappable)."""

    def residuals(self, batch):
        x_b, x_r = batch
        x_r = x_r.requires_grad_(True)
        u = self.net(x_r)
        du = torch.autograd.grad(u.sum(), x_r, create_graph=True)[0]
        lap = sum(torch.autograd.grad(du[:, i].sum(), x_r, create_graph=True)[0][:, i : i + 1] for i in range(self.d))
        return {"bc": self.net(x_b), "pde": lap - source(x_r[:, :1])}


def make_batch(n: int, device: torch.device, seed: int = 0, d: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g).to(device), torch.rand(n, d, generator=g).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(model: FastPoisson, batch):
    """A plain training step on a copy of the model, so timing it leaves the model as it was."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.step_losses(batch).total
        loss.backward()
        opt.step()

    return step

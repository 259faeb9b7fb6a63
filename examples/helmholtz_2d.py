"""2-D Helmholtz equation with plain, NTK and gradient-norm weights (Wang, Teng & Perdikaris 2021).

    Δu + k² u = q on [−1, 1]²,  u = 0 on the boundary,
    exact u = sin(a₁πx) sin(a₂πy) with a₁ = 1, a₂ = 4, k = 1,  q = (k² − (a₁π)² − (a₂π)²) u

Two terms: "bc" (u on 4 × 32 random boundary points) and "pde" (the residual on 128 random interior
points), fresh at every step. The residual is written in the ordinary PyTorch style
(``requires_grad_`` + ``torch.autograd.grad``) on an ``nn.Sequential`` tanh MLP, the code most users
already have; its exact NTK traces take the Gram path. The reference is the closed form on a
101 × 101 grid.

    python examples/helmholtz_2d.py                           # 4 runs, 10,000 steps each (~8 min on 2 cores)
    python examples/helmholtz_2d.py --runs plain ntk          # a subset
    python examples/helmholtz_2d.py --paper                   # 4×50, 40,000 steps (the paper's)
    python examples/helmholtz_2d.py fit --config examples/configs/helmholtz_2d_ntk.yaml   # LightningCLI
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pinn_runner import (
    FreshPoints,
    GridPINN,
    add_common_args,
    add_optimizer_args,
    cli_or_compare,
    compare,
    grid_2d,
    lightning_cli,
    tanh_mlp,
)

A1, A2, K = 1.0, 4.0, 1.0


def exact_solution(xy: torch.Tensor) -> torch.Tensor:
    return torch.sin(A1 * math.pi * xy[:, 0]) * torch.sin(A2 * math.pi * xy[:, 1])


def source(xy: torch.Tensor) -> torch.Tensor:
    return (K**2 - (A1 * math.pi) ** 2 - (A2 * math.pi) ** 2) * exact_solution(xy)


class Helmholtz2D(GridPINN):
    """Helmholtz PINN; ``width``/``depth``: the tanh MLP, ``lr``/``decay_*``: Adam with exponential decay;
    ``optimizer``: ``"adam"``, ``"soap"`` or ``"gauss_newton"`` (first ``damping``)."""

    name = "helmholtz_2d"
    figure = ((101, 101), (-1.0, 1.0, -1.0, 1.0), ("x", "y"), ("u",))

    def __init__(
        self,
        width: int = 50,
        depth: int = 4,
        lr: float = 1e-3,
        decay_rate: float = 0.9,
        decay_steps: int = 1000,
        optimizer: str = "adam",
        damping: float = 1e-3,
    ) -> None:
        super().__init__(terms=["bc", "pde"])
        self.save_hyperparameters()
        self.net = tanh_mlp(width, depth)
        grid = grid_2d(101, 101, (-1.0, 1.0), (-1.0, 1.0))
        self.register_buffer("grid", grid, persistent=False)
        self.register_buffer("reference", exact_solution(grid), persistent=False)

    def u(self, xy: torch.Tensor) -> torch.Tensor:
        return self.net(xy).squeeze(-1)

    def residuals(self, batch):
        xy = batch["pde"].clone().requires_grad_(True)
        u = self.u(xy)
        du = torch.autograd.grad(u.sum(), xy, create_graph=True)[0]
        u_xx = torch.autograd.grad(du[:, 0].sum(), xy, create_graph=True)[0][:, 0]
        u_yy = torch.autograd.grad(du[:, 1].sum(), xy, create_graph=True)[0][:, 1]
        return {"bc": self.u(batch["bc"]), "pde": u_xx + u_yy + K**2 * u - source(batch["pde"])}


def sample_points(g: torch.Generator, per_side: int, interior: int) -> dict[str, torch.Tensor]:
    """``per_side`` random points on each of the four sides and ``interior`` inside the square."""
    s = torch.rand(4, per_side, generator=g) * 2 - 1
    one = torch.ones(per_side)
    sides = [(-one, s[0]), (one, s[1]), (s[2], -one), (s[3], one)]
    bc = torch.cat([torch.stack(side, dim=1) for side in sides])
    return {"bc": bc, "pde": torch.rand(interior, 2, generator=g) * 2 - 1}


class HelmholtzData(pl.LightningDataModule):
    """Fresh boundary (``4 × per_side``) and interior points at every step (``fixed``: one set for all steps)."""

    def __init__(self, per_side: int = 32, interior: int = 128, seed: int = 0, fixed: bool = False) -> None:
        super().__init__()
        self.per_side, self.interior, self.seed, self.fixed = per_side, interior, seed, fixed

    def train_dataloader(self):
        points = FreshPoints(lambda g: sample_points(g, self.per_side, self.interior), self.seed, self.fixed)
        return torch.utils.data.DataLoader(points, batch_size=None)


def build(args: argparse.Namespace) -> tuple[Helmholtz2D, HelmholtzData]:
    model = Helmholtz2D(args.width, args.depth, optimizer=args.optimizer, damping=args.damping)
    return model, HelmholtzData(args.per_side, args.interior, args.seed, args.fixed_points)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=10_000, update_every=100)
    add_optimizer_args(p)
    p.add_argument("--per-side", type=int, default=32, help="boundary points per side and step")
    p.add_argument("--interior", type=int, default=128, help="interior points per step")
    p.add_argument("--fixed-points", action="store_true", help="one fixed point set for every step (default: fresh)")
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--depth", type=int, default=4, help="hidden layers")
    p.add_argument("--paper", action="store_true", help="40,000 steps, weights every 1,000 (a GPU job)")
    args = p.parse_args(argv)
    if args.paper:
        for key, value in {"steps": 40_000, "update_every": 1000, "report_every": 2000}.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def compare_main(argv=None):
    return compare("helmholtz_2d", build, parse_args(argv))


def cli_main(args=None, run: bool = True):
    """``python examples/helmholtz_2d.py fit --config examples/configs/helmholtz_2d_ntk.yaml``."""
    return lightning_cli(Helmholtz2D, HelmholtzData, args, run)


if __name__ == "__main__":
    cli_or_compare(cli_main, compare_main)

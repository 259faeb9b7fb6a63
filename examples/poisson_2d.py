"""2-D Poisson equation, the energy-natural-gradient benchmark: Gauss–Newton against NTK-weighted Adam.

    −Δu = 2π² sin(πx) sin(πy) on [0, 1]²,  u = 0 on the boundary,  exact u = sin(πx) sin(πy)

Two terms: "pde" (900 interior points) and "bc" (120 boundary points), one fixed point set; the residual in
the ordinary autograd style on a tanh MLP (2 × 32). The error is the relative L² error on a 101 × 101 grid.

    python examples/poisson_2d.py                                    # Gauss–Newton, 10 minutes, float64
    python examples/poisson_2d.py --optimizer adam --seconds 600     # NTK-weighted Adam, same wall time
    python examples/poisson_2d.py --out curve.json                   # error against seconds
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pinn_runner import GridPINN, SampledPoints, grid_2d, tanh_mlp, timed_args, timed_fit


def exact_solution(xy: torch.Tensor) -> torch.Tensor:
    return torch.sin(math.pi * xy[:, 0]) * torch.sin(math.pi * xy[:, 1])


class Poisson2D(GridPINN):
    """``optimizer``: ``"gauss_newton"`` or ``"adam"`` (lr decayed 0.9 every ``decay_steps``)."""

    name = "poisson_2d"
    figure = ((101, 101), (0.0, 1.0, 0.0, 1.0), ("x", "y"), ("u",))

    def __init__(
        self,
        width: int = 32,
        depth: int = 2,
        optimizer: str = "gauss_newton",
        lr: float = 1e-3,
        decay_rate: float = 0.9,
        decay_steps: int = 1000,
        damping: float = 1e-3,
    ) -> None:
        super().__init__(terms=["pde", "bc"])
        self.save_hyperparameters()
        self.net = tanh_mlp(width, depth)
        grid = grid_2d(101, 101, (0.0, 1.0), (0.0, 1.0))
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
        f = 2 * math.pi**2 * exact_solution(batch["pde"])
        return {"pde": -(u_xx + u_yy) - f, "bc": self.u(batch["bc"])}


def sample_points(g: torch.Generator, interior: int, boundary: int) -> dict[str, torch.Tensor]:
    """``interior`` uniform points in the square and ``boundary`` on its sides (a quarter each)."""
    k = boundary // 4
    s = torch.rand(4, k, generator=g, dtype=torch.float64)
    zero, one = torch.zeros(k, dtype=torch.float64), torch.ones(k, dtype=torch.float64)
    sides = [(zero, s[0]), (one, s[1]), (s[2], zero), (s[3], one)]
    bc = torch.cat([torch.stack(side, 1) for side in sides])
    return {"pde": torch.rand(interior, 2, generator=g, dtype=torch.float64), "bc": bc}


def parse_args(argv=None) -> argparse.Namespace:
    return timed_args(__doc__, seconds=600.0, width=32, depth=2, interior=900, boundary=120, argv=argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    model = Poisson2D(args.width, args.depth, args.optimizer, lr=args.lr, damping=args.damping)
    sample = functools.partial(sample_points, interior=args.interior, boundary=args.boundary)
    data = SampledPoints(sample, args.seed, fixed=not args.fresh)
    return timed_fit(model, data, args)


if __name__ == "__main__":
    main()

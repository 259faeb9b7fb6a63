"""Kovasznay flow (steady 2-D Navier–Stokes, Re = 40 as in NSFnet): Gauss–Newton against NTK-weighted Adam.

    u u_x + v u_y + p_x − (u_xx + u_yy)/Re = 0,  u v_x + v v_y + p_y − (v_xx + v_yy)/Re = 0,  u_x + v_y = 0
    on [−0.5, 1] × [−0.5, 1.5];  u = 1 − e^{λx} cos 2πy,  v = λ/(2π) e^{λx} sin 2πy,  λ = Re/2 − √(Re²/4 + 4π²)

Four terms: "mom_x", "mom_y", "div" (512 interior points) and "bc" (u and v on 128 boundary points, a
two-column residual), one fixed point set. Residuals in the ordinary autograd style on a tanh MLP (three
outputs u, v, p). The error is the relative L² error of u on a 101 × 101 grid (v's is printed too).

    python examples/kovasznay_2d.py                                # Gauss–Newton, 5 minutes, float64
    python examples/kovasznay_2d.py --optimizer adam --seconds 300 # NTK-weighted Adam, same wall time
    python examples/kovasznay_2d.py --out curve.json               # error against seconds, for results.md

Wall time is the Trainer's (``max_time``); the error evaluations are not counted in it.
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

RE = 40.0
LAM = RE / 2 - math.sqrt(RE**2 / 4 + 4 * math.pi**2)
X, Y = (-0.5, 1.0), (-0.5, 1.5)


def exact_solution(xy: torch.Tensor) -> torch.Tensor:
    """``(N, 3)``: u, v, p."""
    x, y = xy[:, 0], xy[:, 1]
    e = torch.exp(LAM * x)
    u = 1 - e * torch.cos(2 * math.pi * y)
    v = LAM / (2 * math.pi) * e * torch.sin(2 * math.pi * y)
    p = 0.5 * (1 - torch.exp(2 * LAM * x))
    return torch.stack([u, v, p], dim=1)


class Kovasznay(GridPINN):
    """Kovasznay PINN; ``optimizer``: ``"gauss_newton"`` (damped Gauss–Newton) or ``"adam"`` (lr decayed 0.9
    every ``decay_steps``)."""

    name = "kovasznay_2d"
    figure = ((101, 101), (*X, *Y), ("x", "y"), ("u",))

    def __init__(
        self,
        width: int = 32,
        depth: int = 3,
        optimizer: str = "gauss_newton",
        lr: float = 1e-3,
        decay_rate: float = 0.9,
        decay_steps: int = 1000,
        damping: float = 1e-3,
    ) -> None:
        super().__init__(terms=["mom_x", "mom_y", "div", "bc"])
        self.save_hyperparameters()
        self.net = tanh_mlp(width, depth, inputs=2, outputs=3)
        grid = grid_2d(101, 101, X, Y)
        self.register_buffer("grid", grid, persistent=False)
        self.register_buffer("reference", exact_solution(grid)[:, 0], persistent=False)
        self.register_buffer("reference_v", exact_solution(grid)[:, 1], persistent=False)

    def u(self, xy: torch.Tensor) -> torch.Tensor:
        return self.net(xy)[:, 0]

    @torch.no_grad()
    def v_error(self) -> float:
        v = self.net(self.grid.to(self.reference_v))[:, 1]
        return float((v - self.reference_v).norm() / self.reference_v.norm())

    def residuals(self, batch):
        xy = batch["pde"].clone().requires_grad_(True)
        u, v, p = self.net(xy).unbind(1)

        def grad(f: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(f.sum(), xy, create_graph=True)[0]

        du, dv, dp = grad(u), grad(v), grad(p)
        lap_u = grad(du[:, 0])[:, 0] + grad(du[:, 1])[:, 1]
        lap_v = grad(dv[:, 0])[:, 0] + grad(dv[:, 1])[:, 1]
        bc = self.net(batch["bc"])[:, :2] - batch["bc_values"]
        return {
            "mom_x": u * du[:, 0] + v * du[:, 1] + dp[:, 0] - lap_u / RE,
            "mom_y": u * dv[:, 0] + v * dv[:, 1] + dp[:, 1] - lap_v / RE,
            "div": du[:, 0] + dv[:, 1],
            "bc": bc,
        }


def sample_points(g: torch.Generator, interior: int, boundary: int) -> dict[str, torch.Tensor]:
    """``interior`` uniform points in the rectangle, ``boundary`` on its sides (a quarter each)."""
    r = torch.rand(interior, 2, generator=g, dtype=torch.float64)
    pde = torch.stack([X[0] + (X[1] - X[0]) * r[:, 0], Y[0] + (Y[1] - Y[0]) * r[:, 1]], 1)
    k = boundary // 4
    s = torch.rand(4, k, generator=g, dtype=torch.float64)
    full = torch.full((k,), 1.0, dtype=torch.float64)
    bc = torch.cat(
        [
            torch.stack([X[0] * full, Y[0] + (Y[1] - Y[0]) * s[0]], 1),
            torch.stack([X[1] * full, Y[0] + (Y[1] - Y[0]) * s[1]], 1),
            torch.stack([X[0] + (X[1] - X[0]) * s[2], Y[0] * full], 1),
            torch.stack([X[0] + (X[1] - X[0]) * s[3], Y[1] * full], 1),
        ]
    )
    return {"pde": pde, "bc": bc, "bc_values": exact_solution(bc)[:, :2]}


def parse_args(argv=None) -> argparse.Namespace:
    return timed_args(__doc__, seconds=300.0, width=32, depth=3, interior=512, boundary=128, argv=argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    model = Kovasznay(args.width, args.depth, args.optimizer, lr=args.lr, damping=args.damping)
    sample = functools.partial(sample_points, interior=args.interior, boundary=args.boundary)
    data = SampledPoints(sample, args.seed, fixed=not args.fresh)
    return timed_fit(model, data, args, extra={"v": model.v_error})


if __name__ == "__main__":
    main()

"""Viscous Burgers equation, a nonlinear PDE, with plain, NTK and gradient-norm weights.

    u_t + u u_x = ν u_xx on x ∈ [−1, 1], t ∈ [0, 1],  ν = 0.01/π,
    u(x, 0) = −sin(πx),  u(−1, t) = u(1, t) = 0

The standard PINN benchmark (Raissi, Perdikaris & Karniadakis 2019). Three terms: "ic" (u + sin(πx)
at t = 0), "bc" (u at x = ±1) and "pde" (u_t + u u_x − ν u_xx), fresh random points at every step.
The derivatives are taken in the ordinary autograd style (``requires_grad_`` +
``torch.autograd.grad``); the nonlinear term ``u u_x`` is a product of two network outputs. The
reference is the Cole–Hopf solution

    u(x, t) = −∫ sin(π(x−η)) f(x−η) e^{−η²/4νt} dη / ∫ f(x−η) e^{−η²/4νt} dη,  f(y) = e^{−cos(πy)/2πν}

by Gauss–Hermite quadrature (:func:`cole_hopf`), on a 256 × 101 grid. A shock forms at x = 0; the
steepest slope, |u_x(0, 1.6037/π)| = 152.00516 (Basdevant et al. 1986), is what the quadrature is tested
against.

With ``--features`` (any of ``fourier rwf modified``) the network is the one of :mod:`networks`
(JAX-PI's Burgers recipe) instead of the tanh MLP; ``+causal`` runs weight the PDE term causally in
time (:class:`~lightning_ntk.CausalWeighting`), and the NTK trace of that term is then the causal one.

    python examples/burgers_1d.py                            # 4 runs, reduced CPU setting (minutes)
    python examples/burgers_1d.py --runs plain ntk           # a subset
    python examples/burgers_1d.py --features fourier rwf modified --runs plain ntk ntk+causal
    # stays ≤ 1e-2 over its last 20 % of steps (4.2e-3 at worst; docs/results.md), 16 min on one thread:
    python examples/burgers_1d.py --steps 25000 --width 64 --depth 3 --interior 1024 --report-every 500 \
        --features fourier rwf modified --runs ntk+causal --ntk-mode mean_trace
    python examples/burgers_1d.py fit --config examples/configs/burgers_1d_ntk.yaml   # LightningCLI
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import torch

from lightning_ntk import CausalWeighting

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from networks import network_from_options
from pinn_runner import (
    GridPINN,
    InitialBoundaryInteriorData,
    add_common_args,
    add_time_dependent_args,
    cli_or_compare,
    compare,
    grid_2d,
    lightning_cli,
    tanh_mlp,
    time_dependent_options,
)

NU = 0.01 / math.pi


def gauss_hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and log-weights of ``∫ g(z) e^{−z²} dz ≈ Σ_k e^{log w_k} g(z_k)``, float64.

    Nodes from the eigenvalues of the Jacobi matrix (Golub–Welsch); weights from the Christoffel
    formula ``w_k = 1 / Σ_j p_j(z_k)²`` with the orthonormal Hermite polynomials ``p_j``, which stays
    accurate in the tails (``w_k`` down to e^{−700}), where the Golub–Welsch eigenvector weights are
    only accurate to ~1e-16 absolute. The Burgers shock needs those tails.
    """
    off = torch.sqrt(torch.arange(1, n, dtype=torch.float64) / 2)
    z = torch.linalg.eigvalsh(torch.diag(off, 1) + torch.diag(off, -1))
    prev, cur = torch.zeros_like(z), torch.full_like(z, math.pi**-0.25)
    total = cur.square()
    for j in range(n - 1):
        prev, cur = cur, math.sqrt(2 / (j + 1)) * z * cur - math.sqrt(j / (j + 1)) * prev
        total = total + cur.square()
    return z, -torch.log(total)


def cole_hopf(x: torch.Tensor, t: torch.Tensor, nu: float = NU, nodes: int = 200) -> torch.Tensor:
    """The exact solution of the Burgers problem above at points ``(x, t)`` (1-D tensors), float64."""
    z, log_w = gauss_hermite(nodes)
    x, t = x.double().reshape(-1, 1), t.double().reshape(-1, 1)
    y = x - 2 * torch.sqrt(nu * t) * z  # the substitution η = 2√(νt) z
    # log f(y) + log w, shifted by its maximum per point: f spans e^{±1/2πν} = e^{±50}.
    log_terms = -torch.cos(math.pi * y) / (2 * math.pi * nu) + log_w
    weights = torch.softmax(log_terms, dim=1)
    return -(weights * torch.sin(math.pi * y)).sum(dim=1)


@functools.cache
def reference_on_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """The 256 × 101 grid and the Cole–Hopf solution on it (computed once per process, ~2 s)."""
    grid = grid_2d(256, 101, (-1.0, 1.0), (0.0, 1.0))
    return grid, cole_hopf(grid[:, 0], grid[:, 1]).float()


class Burgers1D(GridPINN):
    """Burgers PINN.

    Args:
        width, depth: Hidden width and layers.
        lr, decay_rate, decay_steps: Adam with exponential decay.
        features: ``None``: a tanh MLP; a list of ``"fourier"``, ``"rwf"``, ``"modified"``: the network of
            :func:`networks.network_from_options` with those parts.
        fourier_scale: σ of the Fourier features.
        causal_chunks: Weight the PDE term causally over this many time chunks; 0: off.
        causal_epsilon: ε of the causal weights.
        optimizer: ``"adam"``, ``"soap"`` (``pytorch-optimizer``) or ``"gauss_newton"``
            (:class:`~lightning_ntk.NTKGaussNewton`).
        damping: The first damping of ``"gauss_newton"``.
    """

    name = "burgers_1d"
    figure = ((256, 101), (-1.0, 1.0, 0.0, 1.0), ("x", "t"), ("u",))

    def __init__(
        self,
        width: int = 50,
        depth: int = 4,
        lr: float = 1e-3,
        decay_rate: float = 0.9,
        decay_steps: int = 1000,
        features: list[str] | None = None,
        fourier_scale: float = 1.0,
        causal_chunks: int = 0,
        causal_epsilon: float = 1.0,
        optimizer: str = "adam",
        damping: float = 1e-3,
    ) -> None:
        causal = (
            {"pde": CausalWeighting(time_column=1, num_chunks=causal_chunks, epsilon=causal_epsilon)}
            if causal_chunks
            else None
        )
        super().__init__(terms=["ic", "bc", "pde"], causal=causal)
        self.save_hyperparameters()
        if features is None:
            self.net = tanh_mlp(width, depth)
        else:
            self.net = network_from_options(2, width, depth, 1, None, features, fourier_scale)
        grid, reference = reference_on_grid()
        self.register_buffer("grid", grid.clone(), persistent=False)
        self.register_buffer("reference", reference.clone(), persistent=False)

    def u(self, xt: torch.Tensor) -> torch.Tensor:
        return self.net(xt).squeeze(-1)

    def residuals(self, batch):
        xt = batch["pde"].clone().requires_grad_(True)
        u = self.u(xt)
        du = torch.autograd.grad(u.sum(), xt, create_graph=True)[0]
        u_x, u_t = du[:, 0], du[:, 1]
        u_xx = torch.autograd.grad(u_x.sum(), xt, create_graph=True)[0][:, 0]
        x0 = batch["ic"]
        return {
            "ic": self.u(x0) + torch.sin(math.pi * x0[:, 0]),
            "bc": self.u(batch["bc"]),
            "pde": u_t + u * u_x - NU * u_xx,
        }

    def residual_points(self, batch):
        return {"pde": batch["pde"]}


def sample_points(g: torch.Generator, initial: int, boundary: int, interior: int) -> dict[str, torch.Tensor]:
    x0 = torch.rand(initial, generator=g) * 2 - 1
    side = torch.where(torch.rand(boundary, generator=g) < 0.5, -1.0, 1.0)
    return {
        "ic": torch.stack([x0, torch.zeros(initial)], dim=1),
        "bc": torch.stack([side, torch.rand(boundary, generator=g)], dim=1),
        "pde": torch.stack([torch.rand(interior, generator=g) * 2 - 1, torch.rand(interior, generator=g)], dim=1),
    }


class BurgersData(InitialBoundaryInteriorData):
    """Fresh initial, boundary and interior points at every step."""

    sample = staticmethod(sample_points)


def build(args: argparse.Namespace) -> tuple[Burgers1D, BurgersData]:
    data = BurgersData(args.initial, args.boundary, args.interior, seed=args.seed, fixed=args.fixed_points)
    return Burgers1D(**time_dependent_options(args)), data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=3000, update_every=100, causal=True)
    add_time_dependent_args(p, width=50, depth=4)
    p.add_argument("--long", action="store_true", help="20,000 steps, weights every 1,000 (a GPU job)")
    args = p.parse_args(argv)
    if args.long:
        for key, value in {"steps": 20_000, "update_every": 1000, "report_every": 2000}.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def compare_main(argv=None):
    return compare("burgers_1d", build, parse_args(argv))


def cli_main(args=None, run: bool = True):
    """``python examples/burgers_1d.py fit --config examples/configs/burgers_1d_ntk.yaml``."""
    return lightning_cli(Burgers1D, BurgersData, args, run)


if __name__ == "__main__":
    cli_or_compare(cli_main, compare_main)

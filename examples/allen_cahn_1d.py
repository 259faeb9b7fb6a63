"""Allen–Cahn equation as a two-field (vector-valued) PINN, with plain, NTK and gradient-norm weights.

    u_t = ε v_x + 5u − 5u³,  v = u_x,  ε = 1e-4,  x ∈ [−1, 1] periodic, t ∈ [0, 1],
    u(x, 0) = x² cos(πx)

A stiff nonlinear benchmark (Wang, Sankaran & Perdikaris 2022; JAX-PI). The network has two outputs,
``(u, v)``, with ``v`` the flux ``u_x``, so no residual needs a second derivative; four terms:
"ic" (u − u₀ at t = 0), "periodic" (two rows per point: u and v at x = −1 minus at x = 1),
"pde" (u_t − ε v_x − 5u + 5u³) and "flux" (v − u_x). The reference comes from an ETDRK4 Fourier
spectral solver (:func:`etdrk4`, Cox & Matthews 2002 with the contour-integral coefficients of
Kassam & Trefethen 2005), written here and tested against the closed-form solution for a constant
initial state, on 256 × 101 points of (x, t).

With ``--features`` (any of ``fourier rwf modified``, or none) the example switches to JAX-PI's
formulation (its ``examples/allen_cahn``): one field ``u``, ``x`` embedded periodically (a hard
constraint, so there is no periodic term), the network of :mod:`networks` with those parts, and two
terms: "ic" and "pde" (``u_t − ε u_xx − 5u + 5u³``). ``+causal`` runs weight the PDE term causally in
time (:class:`~lightning_ntk.CausalWeighting`); the NTK trace of that term is then the causal one.

    python examples/allen_cahn_1d.py                          # 4 runs, reduced CPU setting (minutes)
    python examples/allen_cahn_1d.py --runs plain ntk         # a subset
    python examples/allen_cahn_1d.py --features fourier rwf modified --runs ntk+causal grad_norm+causal
    python examples/allen_cahn_1d.py fit --config examples/configs/allen_cahn_1d_ntk.yaml   # LightningCLI
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import torch

from lightning_ntk import CausalWeighting
from lightning_ntk.derivatives import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from networks import network_from_options
from pinn_runner import (
    GridPINN,
    InitialBoundaryInteriorData,
    add_common_args,
    add_time_dependent_args,
    cli_or_compare,
    compare,
    lightning_cli,
    tanh_mlp,
    time_dependent_options,
)

EPS = 1e-4


def initial_state(x: torch.Tensor) -> torch.Tensor:
    return x.square() * torch.cos(math.pi * x)


def etdrk4(u0: torch.Tensor, t_end: float, dt: float, eps: float = EPS, save_every: int = 1) -> torch.Tensor:
    """Solves ``u_t = ε u_xx + 5u − 5u³`` on the periodic [−1, 1] from ``u0`` (samples at ``x_j = −1 + 2j/N``).

    Returns the states at ``t = 0, save_every·dt, …, t_end`` as rows, float64. ETDRK4 integrates the
    stiff linear part ``L = 5 − ε k²`` exactly; its ``φ``-function coefficients are evaluated by a
    contour integral over 32 points (Kassam & Trefethen 2005), which avoids their cancellation.
    """
    n = u0.numel()
    k = torch.fft.rfftfreq(n, d=2.0 / n, dtype=torch.float64) * 2 * math.pi  # period 2: k = π m
    lin = 5.0 - eps * k.square()
    e, e2 = torch.exp(dt * lin), torch.exp(dt * lin / 2)
    r = torch.exp(1j * math.pi * (torch.arange(1, 33, dtype=torch.float64) - 0.5) / 32)
    lr = dt * lin[:, None] + r[None, :]
    q = dt * ((torch.exp(lr / 2) - 1) / lr).mean(1).real
    f1 = dt * ((-4 - lr + torch.exp(lr) * (4 - 3 * lr + lr.square())) / lr**3).mean(1).real
    f2 = dt * ((2 + lr + torch.exp(lr) * (-2 + lr)) / lr**3).mean(1).real
    f3 = dt * ((-4 - 3 * lr - lr.square() + torch.exp(lr) * (4 - lr)) / lr**3).mean(1).real

    def nonlinear(v_hat: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(-5.0 * torch.fft.irfft(v_hat, n).pow(3))

    v = torch.fft.rfft(u0.double())
    steps = round(t_end / dt)
    states = [u0.double()]
    for step in range(1, steps + 1):
        nv = nonlinear(v)
        a = e2 * v + q * nv
        na = nonlinear(a)
        b = e2 * v + q * na
        nb = nonlinear(b)
        c = e2 * a + q * (2 * nb - nv)
        nc = nonlinear(c)
        v = e * v + nv * f1 + 2 * (na + nb) * f2 + nc * f3
        if step % save_every == 0:
            states.append(torch.fft.irfft(v, n))
    return torch.stack(states)


@functools.cache
def reference_on_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, t) grid points (256 × 101, x-major) and the ETDRK4 solution there (512 modes, dt = 1e-3:
    within 2e-11 of dt = 1e-4, and within 1.4e-6 of 1,024 modes)."""
    n = 512
    x = -1 + 2 * torch.arange(n, dtype=torch.float64) / n
    states = etdrk4(initial_state(x), 1.0, 1e-3, save_every=10)  # t = 0, 0.01, …, 1
    u = states[:, ::2].T  # every other point: 256 values of x from −1, (x, t) order
    grid = torch.stack(torch.meshgrid(x[::2], torch.linspace(0, 1, 101, dtype=torch.float64), indexing="ij"), -1)
    return grid.reshape(-1, 2).float(), u.reshape(-1).float()


class AllenCahn1D(GridPINN):
    """Allen–Cahn PINN.

    Args:
        width, depth: Hidden width and layers.
        lr, decay_rate, decay_steps: Adam with exponential decay.
        features: ``None``: the two-field tanh MLP with four terms. A list (possibly empty) of
            ``"fourier"``, ``"rwf"``, ``"modified"``: JAX-PI's one-field formulation with a periodic
            embedding of x and the network of :func:`networks.network_from_options`.
        fourier_scale: σ of the Fourier features.
        causal_chunks: Weight the PDE term causally over this many time chunks; 0: off.
        causal_epsilon: ε of the causal weights.
        optimizer: ``"adam"``, ``"soap"`` (``pytorch-optimizer``) or ``"gauss_newton"``
            (:class:`~lightning_ntk.NTKGaussNewton`).
        damping: The first damping of ``"gauss_newton"``.
    """

    name = "allen_cahn_1d"
    figure = ((256, 101), (-1.0, 1.0, 0.0, 1.0), ("x", "t"), ("u",))

    def __init__(
        self,
        width: int = 64,
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
        terms = ["ic", "periodic", "pde", "flux"] if features is None else ["ic", "pde"]
        super().__init__(terms=terms, causal=causal)
        self.save_hyperparameters()
        if features is None:
            self.net = tanh_mlp(width, depth, outputs=2)
        else:
            self.net = network_from_options(2, width, depth, 1, {0: 2.0}, features, fourier_scale)
        grid, reference = reference_on_grid()
        self.register_buffer("grid", grid.clone(), persistent=False)
        self.register_buffer("reference", reference.clone(), persistent=False)

    def u(self, xt: torch.Tensor) -> torch.Tensor:
        return self.net(xt)[:, 0]

    def residuals(self, batch):
        if self.hparams.features is not None:
            return self._one_field_residuals(batch)
        xt = batch["pde"]
        uv = self.net(xt)
        u, v = uv[:, 0], uv[:, 1]
        d_t = partial(self.net, xt, 1)  # (u_t, v_t)
        d_x = partial(self.net, xt, 0)  # (u_x, v_x)
        x0 = batch["ic"]
        left = batch["periodic"]
        right = torch.cat([-left[:, :1], left[:, 1:]], dim=1)
        return {
            "ic": self.u(x0) - initial_state(x0[:, 0]),
            "periodic": self.net(left) - self.net(right),
            "pde": d_t[:, 0] - EPS * d_x[:, 1] - 5 * u + 5 * u.pow(3),
            "flux": v - d_x[:, 0],
        }

    def _one_field_residuals(self, batch):
        xt = batch["pde"].clone().requires_grad_(True)
        u = self.u(xt)
        du = torch.autograd.grad(u.sum(), xt, create_graph=True)[0]
        u_xx = torch.autograd.grad(du[:, 0].sum(), xt, create_graph=True)[0][:, 0]
        x0 = batch["ic"]
        return {"ic": self.u(x0) - initial_state(x0[:, 0]), "pde": du[:, 1] - EPS * u_xx - 5 * u + 5 * u.pow(3)}

    def residual_points(self, batch):
        return {"pde": batch["pde"]}


def sample_points(g: torch.Generator, initial: int, boundary: int, interior: int) -> dict[str, torch.Tensor]:
    x0 = torch.rand(initial, generator=g) * 2 - 1
    return {
        "ic": torch.stack([x0, torch.zeros(initial)], dim=1),
        "periodic": torch.stack([-torch.ones(boundary), torch.rand(boundary, generator=g)], dim=1),
        "pde": torch.stack([torch.rand(interior, generator=g) * 2 - 1, torch.rand(interior, generator=g)], dim=1),
    }


class AllenCahnData(InitialBoundaryInteriorData):
    """Fresh initial, boundary (x = −1, mirrored to x = 1) and interior points at every step."""

    sample = staticmethod(sample_points)


def build(args: argparse.Namespace) -> tuple[AllenCahn1D, AllenCahnData]:
    data = AllenCahnData(args.initial, args.boundary, args.interior, seed=args.seed, fixed=args.fixed_points)
    return AllenCahn1D(**time_dependent_options(args)), data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=5000, update_every=100, causal=True)
    add_time_dependent_args(p, width=64, depth=4)
    return p.parse_args(argv)


def compare_main(argv=None):
    return compare("allen_cahn_1d", build, parse_args(argv))


def cli_main(args=None, run: bool = True):
    """``python examples/allen_cahn_1d.py fit --config examples/configs/allen_cahn_1d_ntk.yaml``."""
    return lightning_cli(AllenCahn1D, AllenCahnData, args, run)


if __name__ == "__main__":
    cli_or_compare(cli_main, compare_main)

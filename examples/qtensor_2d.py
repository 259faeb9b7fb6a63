"""A 2-D Landau–de Gennes Q-tensor gradient flow as a two-output PINN (the seed paper's second system).

With ``Q = [[p, q], [q, −p]]`` (symmetric, traceless), bulk energy ``a/2 tr Q² + c/4 (tr Q²)²`` (in 2-D
the cubic term vanishes) and one elastic constant ``L``, the gradient flow is

    p_t = L Δp − a p − 2c (p² + q²) p,   q_t = L Δq − a q − 2c (p² + q²) q

on the periodic unit square, t ∈ [0, 1], with ``L = 0.01``, ``a = −1``, ``c = 1`` (the ordered state
has ``p² + q² = −a / 2c = 0.5``). The initial state

    p₀ = 0.5 sin 2πx,   q₀ = 0.5 sin 2πy + 0.45 cos 2πx

has four zeros of ``(p, q)``: four ±½ disclinations of the director ``n = (cos θ, sin θ)``,
``θ = ½ atan2(q, p)``, in two close pairs (at x = 0, y ≈ 0.67 and 0.83; at x = 0.5, y ≈ 0.17 and
0.33). Over t ∈ [0, 1] the order ``√(p² + q²)`` relaxes from its initial 0–0.95 towards 0.71 away
from the defects, the cores take the size ``√(L/|a|) = 0.1``, and each pair draws together
(separation 0.16 → 0.12 in the reference).

The network takes ``(x, y, t)`` with x and y embedded periodically (``cos 2πx, sin 2πx, …``; a hard
constraint, so there is no boundary term) and has two outputs ``(p, q)``; the two terms "ic" and
"pde" have residuals of shape ``(N, 2)``, the PDE one written in the ordinary autograd style
(``requires_grad_`` and ``torch.autograd.grad(create_graph=True)``), the way a new user writes it.

The reference is computed here by a 2-D Fourier pseudo-spectral ETDRK4 solver (:func:`etdrk4_2d`,
Cox & Matthews 2002, contour-integral coefficients of Kassam & Trefethen 2005), tested against the
closed form for ``c = 0`` (each Fourier mode decays as ``exp(−(L|k|² + a) t)``) and by refinement.

    python examples/qtensor_2d.py --runs plain ntk ntk+causal ntk_fd        # the comparison
    python examples/qtensor_2d.py fit --config examples/configs/qtensor_2d_ntk.yaml   # LightningCLI
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
    lightning_cli,
    save_panels,
    time_dependent_options,
)

L_ELASTIC, A, C = 0.01, -1.0, 1.0
T_END = 1.0


def initial_state(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(p₀, q₀)`` as the last dimension."""
    p = 0.5 * torch.sin(2 * math.pi * x)
    q = 0.5 * torch.sin(2 * math.pi * y) + 0.45 * torch.cos(2 * math.pi * x)
    return torch.stack([p, q], dim=-1)


def etdrk4_2d(
    pq0: torch.Tensor,
    t_end: float,
    dt: float,
    elastic: float = L_ELASTIC,
    a: float = A,
    c: float = C,
    save_every: int = 1,
) -> torch.Tensor:
    """Integrates the flow from ``pq0`` of shape ``(M, M, 2)`` (samples at ``x_i = i/M``, ``y_j = j/M``).

    Returns the states at ``t = 0, save_every·dt, …`` as ``(S, M, M, 2)``, float64. The linear part
    ``−(L|k|² + a)`` of each Fourier mode is integrated exactly; the cubic part ``−2c(p² + q²)(p, q)``
    is evaluated on the grid (no dealiasing: the solution is smooth at the resolutions used here,
    which the refinement test checks).
    """
    m = pq0.shape[0]
    kx = torch.fft.fftfreq(m, d=1.0 / m, dtype=torch.float64) * 2 * math.pi
    ky = torch.fft.rfftfreq(m, d=1.0 / m, dtype=torch.float64) * 2 * math.pi
    lin = -(elastic * (kx[:, None].square() + ky[None, :].square()) + a)
    e, e2 = torch.exp(dt * lin), torch.exp(dt * lin / 2)
    r = torch.exp(1j * math.pi * (torch.arange(1, 33, dtype=torch.float64) - 0.5) / 32)
    lr = dt * lin[..., None] + r
    q = dt * ((torch.exp(lr / 2) - 1) / lr).mean(-1).real
    f1 = dt * ((-4 - lr + torch.exp(lr) * (4 - 3 * lr + lr.square())) / lr**3).mean(-1).real
    f2 = dt * ((2 + lr + torch.exp(lr) * (-2 + lr)) / lr**3).mean(-1).real
    f3 = dt * ((-4 - 3 * lr - lr.square() + torch.exp(lr) * (4 - lr)) / lr**3).mean(-1).real

    def to_grid(v_hat: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(v_hat, s=(m, m), dim=(0, 1))

    def nonlinear(v_hat: torch.Tensor) -> torch.Tensor:
        v = to_grid(v_hat)
        return torch.fft.rfft2(-2 * c * v.square().sum(-1, keepdim=True) * v, dim=(0, 1))

    e, e2, q, f1, f2, f3 = (t[..., None] for t in (e, e2, q, f1, f2, f3))  # the same for p and q
    v = torch.fft.rfft2(pq0.double(), dim=(0, 1))
    states = [pq0.double()]
    for step in range(1, round(t_end / dt) + 1):
        nv = nonlinear(v)
        a_ = e2 * v + q * nv
        na = nonlinear(a_)
        b = e2 * v + q * na
        nb = nonlinear(b)
        c_ = e2 * a_ + q * (2 * nb - nv)
        nc = nonlinear(c_)
        v = e * v + nv * f1 + 2 * (na + nb) * f2 + nc * f3
        if step % save_every == 0:
            states.append(to_grid(v))
    return torch.stack(states)


@functools.cache
def reference_on_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y, t)`` points (32 × 32 × 11, x-major) and ``(p, q)`` there: ETDRK4 with 64² modes and
    dt = 2e-3 (within 1e-9 of dt = 1e-3 and of 128² modes, tested), every other grid point, t = 0, 0.1, …, 1."""
    m = 64
    s = torch.arange(m, dtype=torch.float64) / m
    gx, gy = torch.meshgrid(s, s, indexing="ij")
    states = etdrk4_2d(initial_state(gx, gy), T_END, 2e-3, save_every=50)  # (11, 64, 64, 2)
    sub = states[:, ::2, ::2]  # (11, 32, 32, 2)
    t = torch.linspace(0, T_END, states.shape[0], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(s[::2], s[::2], t, indexing="ij"), -1)  # (32, 32, 11, 3)
    values = sub.permute(1, 2, 0, 3)  # (32, 32, 11, 2)
    return grid.reshape(-1, 3).float(), values.reshape(-1, 2).float()


class QTensor2D(GridPINN):
    """Q-tensor PINN: two outputs ``(p, q)``, terms "ic" and "pde", residuals of shape ``(N, 2)``.

    Args:
        width, depth: Hidden width and layers (the new-user setting of issue 29: 4×128).
        lr, decay_rate, decay_steps: Adam with exponential decay.
        features: Parts of JAX-PI's network (``"fourier"``, ``"rwf"``, ``"modified"``); empty: a tanh
            MLP on the periodic embedding of x and y.
        fourier_scale: σ of the Fourier features.
        causal_chunks: Weight the PDE term causally over this many time chunks; 0: off.
        causal_epsilon: ε of the causal weights.
        optimizer: ``"adam"``, ``"soap"`` (``pytorch-optimizer``) or ``"gauss_newton"``
            (:class:`~lightning_ntk.NTKGaussNewton`).
        damping: The first damping of ``"gauss_newton"``.
    """

    name = "qtensor_2d"

    def __init__(
        self,
        width: int = 128,
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
            {"pde": CausalWeighting(time_column=2, num_chunks=causal_chunks, epsilon=causal_epsilon)}
            if causal_chunks
            else None
        )
        super().__init__(terms=["ic", "pde"], causal=causal)
        self.save_hyperparameters()
        self.net = network_from_options(3, width, depth, 2, {0: 1.0, 1: 1.0}, features or [], fourier_scale)
        grid, reference = reference_on_grid()
        self.register_buffer("grid", grid.clone(), persistent=False)
        self.register_buffer("reference", reference.clone(), persistent=False)

    def u(self, xyt: torch.Tensor) -> torch.Tensor:
        return self.net(xyt)

    def residuals(self, batch):
        xyt = batch["pde"].clone().requires_grad_(True)
        pq = self.net(xyt)
        order = pq.square().sum(1)
        rows = []
        for k in range(2):
            d = torch.autograd.grad(pq[:, k].sum(), xyt, create_graph=True)[0]
            d_xx = torch.autograd.grad(d[:, 0].sum(), xyt, create_graph=True)[0][:, 0]
            d_yy = torch.autograd.grad(d[:, 1].sum(), xyt, create_graph=True)[0][:, 1]
            rows.append(d[:, 2] - L_ELASTIC * (d_xx + d_yy) + A * pq[:, k] + 2 * C * order * pq[:, k])
        x0 = batch["ic"]
        return {"ic": self.net(x0) - initial_state(x0[:, 0], x0[:, 1]), "pde": torch.stack(rows, dim=1)}

    def residual_points(self, batch):
        return {"pde": batch["pde"]}

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir
        if self.trainer.is_global_zero and log_dir is not None and not self.trainer.fast_dev_run:
            save_director_figure(self, os.path.join(log_dir, f"{self.name}.png"))


def sample_points(g: torch.Generator, initial: int, boundary: int, interior: int) -> dict[str, torch.Tensor]:
    """``initial`` points on t = 0 and ``interior`` points in the space-time box (no boundary term)."""
    del boundary  # periodic embedding: no boundary points
    xy0 = torch.rand(initial, 2, generator=g)
    return {"ic": torch.cat([xy0, torch.zeros(initial, 1)], dim=1), "pde": torch.rand(interior, 3, generator=g)}


class QTensorData(InitialBoundaryInteriorData):
    """Fresh initial and interior points at every step."""

    sample = staticmethod(sample_points)


def save_director_figure(model: QTensor2D, path: str) -> str | None:
    """p, q and the director angle at t = 1, predicted and reference; ``None`` without matplotlib."""
    last = model.grid[:, 2] == model.grid[:, 2].max()
    with torch.no_grad():
        pred = model.u(model.grid[last]).cpu().reshape(32, 32, 2)
    ref = model.reference[last].cpu().reshape(32, 32, 2)
    angle = lambda v: 0.5 * torch.atan2(v[..., 1], v[..., 0])  # noqa: E731
    theta, theta_ref = angle(pred), angle(ref)
    # θ and θ + π are one director: show the prediction on the reference's branch, so |error| is
    # the angle between the directors.
    theta = theta_ref + torch.remainder(theta - theta_ref + math.pi / 2, math.pi) - math.pi / 2
    rows = [
        (f"p at t = {T_END:g}", pred[..., 0], ref[..., 0]),
        (f"q at t = {T_END:g}", pred[..., 1], ref[..., 1]),
        (f"director angle θ at t = {T_END:g}", theta, theta_ref),
    ]
    title = f"relative L² error over t ∈ [0, 1]: {model.relative_l2_error():.3e}"
    return save_panels(rows, (0, 1, 0, 1), ("x", "y"), title, path)


def build(args: argparse.Namespace) -> tuple[QTensor2D, QTensorData]:
    data = QTensorData(args.initial, 0, args.interior, seed=args.seed, fixed=args.fixed_points)
    return QTensor2D(**time_dependent_options(args)), data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=2000, update_every=100, causal=True)
    add_time_dependent_args(p, width=128, depth=4)
    p.set_defaults(initial=256, interior=1024, features=[])
    return p.parse_args(argv)


def compare_main(argv=None):
    return compare("qtensor_2d", build, parse_args(argv))


def cli_main(args=None, run: bool = True):
    """``python examples/qtensor_2d.py fit --config examples/configs/qtensor_2d_ntk.yaml``."""
    return lightning_cli(QTensor2D, QTensorData, args, run)


if __name__ == "__main__":
    cli_or_compare(cli_main, compare_main)

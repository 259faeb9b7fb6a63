"""Tiny seeded models shared by the tests, and an independent reference for NTK traces."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import hessian, vmap

from lightning_ntk import PINNModule
from lightning_ntk.derivatives import partial
from lightning_ntk.memory import forget, memory_of
from lightning_ntk.points import batch_signature


def mlp(d_in: int = 1, width: int = 8, d_out: int = 1, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [d_in] + [width] * depth
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(dims[-1], d_out))
    return nn.Sequential(*layers)


def source(x: torch.Tensor) -> torch.Tensor:
    return -16 * math.pi**2 * torch.sin(4 * math.pi * x)


class HelperPoisson(PINNModule):
    """1-D Poisson with input derivatives from lightning_ntk.derivatives (the fast path)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__(terms=["bc", "pde"])
        self.net = mlp(width=width)

    def residuals(self, batch):
        x_b, x_r = batch
        return {"bc": self.net(x_b), "pde": partial(self.net, x_r, 0, 0) - source(x_r)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class AutogradPoisson(HelperPoisson):
    """The same problem in the ordinary PyTorch PINN style (requires_grad_ + autograd.grad)."""

    def residuals(self, batch):
        x_b, x_r = batch
        x_r = x_r.requires_grad_(True)
        u = self.net(x_r)
        u_x = torch.autograd.grad(u.sum(), x_r, create_graph=True)[0]
        u_xx = torch.autograd.grad(u_x.sum(), x_r, create_graph=True)[0]
        return {"bc": self.net(x_b), "pde": u_xx - source(x_r)}


class FuncPoisson(HelperPoisson):
    """The same problem written directly with torch.func (vmap of hessian)."""

    def residuals(self, batch):
        x_b, x_r = batch

        def u(xi):
            return self.net(xi.unsqueeze(0)).squeeze()

        u_xx = vmap(hessian(u))(x_r).reshape(-1, 1)
        return {"bc": self.net(x_b), "pde": u_xx - source(x_r)}


class TwoFieldModel(PINNModule):
    """Vector-valued residuals: two output fields, d=2 entries per point in each term."""

    def __init__(self) -> None:
        super().__init__(terms=["data", "pde"])
        self.net = mlp(d_in=2, width=6, d_out=2)

    def residuals(self, batch):
        x_d, x_r = batch
        u_t = partial(self.net, x_r, 1)
        u_xx = partial(self.net, x_r, 0, 0)
        return {"data": self.net(x_d) - 1.0, "pde": u_t - 0.1 * u_xx + self.net(x_r) ** 3}


class StackedTwoField(nn.Module):
    """Two fields ``(p, q)`` in the usual per-component style: each component's derivatives with
    ``torch.autograd.grad``, its residual row built alone, the rows joined by ``torch.stack`` (as
    ``examples/qtensor_2d.py`` and ``benchmarks/exact_cost.py`` do). Terms ``data`` and ``pde``, each of
    shape (N, components)."""

    terms = ("data", "pde")

    def __init__(self, width: int = 6, components: int = 2) -> None:
        super().__init__()
        self.net = mlp(d_in=2, width=width, d_out=components)

    def residuals(self, batch):
        x_d, x_r = batch
        x_r = x_r.clone().requires_grad_(True)
        u = self.net(x_r)
        rows = []
        for c in range(u.shape[1]):
            g = torch.autograd.grad(u[:, c].sum(), x_r, create_graph=True)[0]
            u_xx = torch.autograd.grad(g[:, 0].sum(), x_r, create_graph=True)[0][:, 0]
            rows.append(g[:, 1] - 0.1 * u_xx + u[:, c] * u.square().sum(1))
        return {"data": self.net(x_d) - 1.0, "pde": torch.stack(rows, 1)}


def two_branches():
    """``x``, two branches ``a = sin 2x`` and ``b = cos 3x``, and the residual ``stack([Σa, Σb], 1)``."""
    x = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    a, b = (2 * x).sin(), (3 * x).cos()
    return x, a, b, torch.stack([a.sum(1), b.sum(1)], 1)


def two_field_batch(n_d: int = 5, n_r: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_d, 2, generator=g, dtype=torch.float64), torch.rand(n_r, 2, generator=g, dtype=torch.float64)


def poisson_batch(n_r: int = 12, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_b = torch.tensor([[0.0], [1.0]], dtype=dtype)
    x_r = torch.rand(n_r, 1, generator=g, dtype=dtype)
    return x_b, x_r


def bc_res_batch(d_in: int, seed: int = 0, n_bc: int = 3, n_res: int = 7) -> dict[str, torch.Tensor]:
    """A float64 batch of boundary points ``"bc"`` and residual points ``"res"`` in ``[0, 1]^d_in``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "bc": torch.rand(n_bc, d_in, generator=g, dtype=torch.float64),
        "res": torch.rand(n_res, d_in, generator=g, dtype=torch.float64),
    }


def reference_point_norms(module: nn.Module, batch, params=None) -> dict[str, torch.Tensor]:
    """Per-point ``Σ_rows ‖∂r/∂θ‖²`` from a hand-built Jacobian: one autograd.grad per row, full batch."""
    if params is None:
        params = [p for p in module.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = module.residuals(batch)
    norms = {}
    for name, r in out.items():
        rows = r.reshape(r.shape[0], -1)
        per_point = torch.zeros(rows.shape[0], dtype=r.dtype)
        for n, k in itertools.product(range(rows.shape[0]), range(rows.shape[1])):
            grads = torch.autograd.grad(rows[n, k], params, retain_graph=True, allow_unused=True)
            per_point[n] += sum(float(g.square().sum()) for g in grads if g is not None)
        norms[name] = per_point
    return norms


def reference_traces(module: nn.Module, batch, params=None) -> dict[str, torch.Tensor]:
    """Tr K_ii from a hand-built Jacobian: the sum of :func:`reference_point_norms`."""
    return {name: v.sum() for name, v in reference_point_norms(module, batch, params).items()}


def layout_entry(module: nn.Module, batch):
    """What the Gram path confirmed for ``module`` and this batch's layout."""
    return memory_of(module).exact[batch_signature(batch)].gram


def assert_exact(estimate, module: nn.Module, batch) -> None:
    """Every trace of ``estimate`` equals the hand-built Jacobian's to 1e-10."""
    want = reference_traces(module, batch)
    for name in want:
        torch.testing.assert_close(estimate.traces[name], want[name], rtol=1e-10, atol=0)


@pytest.fixture(autouse=True)
def _seed_and_fresh_warnings():
    torch.manual_seed(1234)
    # The slow-path warning is issued once per model class; every test starts without that memory.
    forget()


def repeat_loader(batch, steps: int):
    """A DataLoader that yields the same full batch `steps` times (full-batch PINN training)."""
    return torch.utils.data.DataLoader([batch] * steps, batch_size=None, shuffle=False)


def quiet_trainer(tmp_path, **kwargs):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)

"""1-D wave equation with and without NTK weights (Wang, Yu & Perdikaris 2022, §7.3).

    u_tt = 4 u_xx on (x, t) ∈ [0, 1]²,  u(0, t) = u(1, t) = 0,
    u(x, 0) = sin(πx) + ½ sin(4πx),  u_t(x, 0) = 0,
    exact u = sin(πx) cos(2πt) + ½ sin(4πx) cos(8πt)

Three terms: "u" (u − g on initial and boundary points), "ut" (u_t on initial points) and "res"
(u_tt − 4 u_xx), each a fresh batch of 300 random points at every step. Adam with the learning rate
decayed by 0.9 every 1,000 steps. Validation: relative L² error on a fixed 101 × 101 grid.

    python examples/wave_1d.py                                           # plain vs NTK, reduced CPU setting
    python examples/wave_1d.py fit --config examples/configs/wave_1d_ntk.yaml     # LightningCLI
    python examples/wave_1d.py fit --config examples/configs/wave_1d_ntk.yaml --trainer.max_steps 80000 \\
        --model.width 500 --model.depth 5                                # the paper's setting
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_ntk import NTKWeightingCallback, PINNModule
from lightning_ntk.derivatives import partial
from lightning_ntk.metrics import RelativeL2Error

C = 2.0  # wave speed: u_tt = C² u_xx


def exact_solution(xt: torch.Tensor) -> torch.Tensor:
    x, t = xt[:, :1], xt[:, 1:]
    return torch.sin(math.pi * x) * torch.cos(2 * math.pi * t) + 0.5 * torch.sin(4 * math.pi * x) * torch.cos(
        8 * math.pi * t
    )


class Wave1D(PINNModule):
    """Tanh MLP u(x, t) with Glorot-normal initialization.

    Args:
        width: Units per hidden layer (paper: 500).
        depth: Hidden layers (paper: 5; the authors' notebook: 3).
        lr: Adam learning rate.
        decay_rate: Learning-rate factor applied every ``decay_steps`` steps.
        decay_steps: Steps between learning-rate decays.
    """

    def __init__(
        self, width: int = 64, depth: int = 3, lr: float = 1e-3, decay_rate: float = 0.9, decay_steps: int = 1000
    ) -> None:
        super().__init__(terms=["u", "ut", "res"])
        self.save_hyperparameters()
        dims = [2] + [width] * depth
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.Tanh()]
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.val_error = RelativeL2Error()

    def residuals(self, batch):
        xt_u, g_u = batch["u"]
        xt_ut, xt_res = batch["ut"], batch["res"]
        u_tt = partial(self.net, xt_res, 1, 1)
        u_xx = partial(self.net, xt_res, 0, 0)
        return {"u": self.net(xt_u) - g_u, "ut": partial(self.net, xt_ut, 1), "res": u_tt - C**2 * u_xx}

    def validation_step(self, batch, batch_idx):
        xt, exact = batch
        self.val_error.update(self.net(xt), exact)
        self.log("val/rel_l2", self.val_error, prog_bar=True, batch_size=xt.shape[0])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.hparams.decay_steps, gamma=self.hparams.decay_rate)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def relative_l2_error(self, grid: int = 101) -> float:
        xt = _grid(grid).to(self.ntk_weights.device)
        exact = exact_solution(xt)
        return float((self.net(xt) - exact).norm() / exact.norm())


def _grid(n: int) -> torch.Tensor:
    axis = torch.linspace(0, 1, n)
    x, t = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x.reshape(-1), t.reshape(-1)], dim=1)


class _FreshPoints(torch.utils.data.IterableDataset):
    def __init__(self, batch_size: int, seed: int) -> None:
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        n = self.batch_size
        while True:
            x0 = torch.rand(n // 2, 1, generator=g)
            ic = torch.cat([x0, torch.zeros_like(x0)], dim=1)
            tb = torch.rand(n - n // 2, 1, generator=g)
            side = (torch.rand(n - n // 2, 1, generator=g) < 0.5).float()
            bc = torch.cat([side, tb], dim=1)
            xt_u = torch.cat([ic, bc])
            g_u = exact_solution(xt_u)  # sin(πx) + ½ sin(4πx) at t = 0, 0 on x ∈ {0, 1}
            x1 = torch.rand(n, 1, generator=g)
            xt_ut = torch.cat([x1, torch.zeros_like(x1)], dim=1)
            xt_res = torch.rand(n, 2, generator=g)
            yield {"u": (xt_u, g_u), "ut": xt_ut, "res": xt_res}


class WaveData(pl.LightningDataModule):
    """Fresh random points for every term at every step; a fixed grid for validation.

    Args:
        batch_size: Points per term per step (paper: 300).
        grid: Validation grid points per axis.
        seed: Seeds the point sampler.
    """

    def __init__(self, batch_size: int = 300, grid: int = 101, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.grid, self.seed = batch_size, grid, seed

    def train_dataloader(self):
        return torch.utils.data.DataLoader(_FreshPoints(self.batch_size, self.seed), batch_size=None)

    def val_dataloader(self):
        xt = _grid(self.grid)
        return torch.utils.data.DataLoader([(xt, exact_solution(xt))], batch_size=None)


def cli_main(args=None, run: bool = True):
    """``python examples/wave_1d.py fit --config examples/configs/wave_1d_ntk.yaml``."""
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(Wave1D, WaveData, args=args, run=run, save_config_kwargs={"overwrite": True})


def compare(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--estimator", default="exact")
    p.add_argument("--logdir", default="lightning_logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="cpu")
    args = p.parse_args(argv)
    rows = []
    for use_ntk in (False, True):
        pl.seed_everything(args.seed, verbose=False)
        model = Wave1D(args.width, args.depth)
        ntk = NTKWeightingCallback(args.update_every, estimator=args.estimator, seed=args.seed) if use_ntk else None
        trainer = pl.Trainer(
            max_steps=args.steps,
            accelerator=args.accelerator,
            devices=1,
            callbacks=[ntk] if ntk else [],
            logger=TensorBoardLogger(args.logdir, name="wave_1d", version="ntk" if use_ntk else "plain"),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            limit_val_batches=0,
            log_every_n_steps=50,
        )
        start = time.perf_counter()
        trainer.fit(model, WaveData(seed=args.seed))
        rows.append(
            (
                "NTK weights" if use_ntk else "plain",
                model.relative_l2_error(),
                time.perf_counter() - start,
                model.term_weights,
            )
        )
        if use_ntk:
            plot(model.cpu(), args.logdir)
    print(f"\n{'run':<12} {'rel. L2 error':>14} {'time [s]':>9}   final weights")
    for name, err, seconds, w in rows:
        print(f"{name:<12} {err:14.3e} {seconds:9.1f}   " + ", ".join(f"{k}={v:.4g}" for k, v in w.items()))
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}/wave_1d")


def plot(model: Wave1D, logdir: str, n: int = 101) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    xt = _grid(n)
    with torch.no_grad():
        pred, exact = model.net(xt).reshape(n, n), exact_solution(xt).reshape(n, n)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, data, title in zip(
        axes, (pred, exact, (pred - exact).abs()), ("prediction", "exact", "|error|"), strict=True
    ):
        im = ax.imshow(data.T, origin="lower", extent=(0, 1, 0, 1), aspect="auto")
        ax.set(xlabel="x", ylabel="t", title=title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(f"{logdir}/wave_1d.png", dpi=110)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "test", "predict", "--help", "-h", "--print_config"):
        cli_main()
    else:
        compare()

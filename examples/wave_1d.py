"""1-D wave equation with and without NTK weights (Wang, Yu & Perdikaris 2022, §7.3).

    u_tt = 4 u_xx on (x, t) ∈ [0, 1]²,  u(0, t) = u(1, t) = 0,
    u(x, 0) = sin(πx) + ½ sin(4πx),  u_t(x, 0) = 0,
    exact u = sin(πx) cos(2πt) + ½ sin(4πx) cos(8πt)

Three terms: "u" (u − g on initial and boundary points), "ut" (u_t on initial points) and "res"
(u_tt − 4 u_xx), each a fresh batch of 300 random points at every step. Adam with the learning rate
decayed by 0.9 every 1,000 steps. Validation: relative L² error on a fixed 101 × 101 grid. At the
end of training, with matplotlib installed (``pip install -e ".[plot]"``), prediction, exact
solution and error are saved as ``wave_1d.png`` in the run's log directory.

    python examples/wave_1d.py                                  # plain vs NTK, reduced CPU setting
    python examples/wave_1d.py --paper --authors-code           # §7.3: 5×500, 80,000 steps (a GPU job)
    OMP_NUM_THREADS=1 python examples/wave_1d.py --runs ntk ... # one run per core, side by side
    python examples/wave_1d.py fit --config examples/configs/wave_1d_ntk.yaml         # LightningCLI
    python examples/wave_1d.py fit --config examples/configs/wave_1d_paper_ntk.yaml   # §7.3 via the CLI

The network is a :class:`~lightning_ntk.taylor.TaylorMLP` by default (``--network sequential`` for
an ``nn.Sequential`` differentiated by ``derivatives.partial``): its exact NTK traces cost about one training
step. ``--authors-code`` switches to the conventions of the authors' published code: standardized
inputs, ``L_u`` as the sum of the means over t = 0, x = 0 and x = 1, continuous lr decay.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pinn_runner import lightning_cli, make_trainer

from lightning_ntk import NTKWeightingCallback, PINNModule, TraceAverager
from lightning_ntk.derivatives import partial
from lightning_ntk.estimators import as_estimator
from lightning_ntk.metrics import RelativeL2Error
from lightning_ntk.taylor import TaylorMLP

C = 2.0  # wave speed: u_tt = C² u_xx
INPUT_STD = 1 / math.sqrt(12)  # standard deviation of U(0, 1)


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
        network: ``"taylor"``: a :class:`~lightning_ntk.taylor.TaylorMLP` whose Taylor streams give
            u_t, u_tt and u_xx in one pass and whose exact traces cost about one training step;
            ``"sequential"``: an ``nn.Sequential`` differentiated with
            :func:`lightning_ntk.derivatives.partial` (nested ``torch.func.grad``). Same
            initialization, same function.
        standardize_inputs: Feed ``(x − 0.5)/σ, (t − 0.5)/σ`` with ``σ = 1/√12`` (the mean and
            standard deviation of the uniform residual points) to the network, as the authors'
            code does; derivatives are taken with respect to the original coordinates.
        u_loss: ``"mean"``: ``L_u = mean(r_u²)`` over all initial and boundary rows;
            ``"sum_of_parts"``: the sum of the means over the three equal parts (t = 0, x = 0,
            x = 1), i.e. 3 × the mean, as in the authors' code.
        staircase: Decay the learning rate in steps every ``decay_steps`` (``True``) or
            continuously, ``lr · decay_rate^(step/decay_steps)`` (``False``, the authors' code).
    """

    def __init__(
        self,
        width: int = 64,
        depth: int = 3,
        lr: float = 1e-3,
        decay_rate: float = 0.9,
        decay_steps: int = 1000,
        network: str = "taylor",
        standardize_inputs: bool = False,
        u_loss: str = "mean",
        staircase: bool = True,
    ) -> None:
        super().__init__(terms=["u", "ut", "res"])
        if network not in ("taylor", "sequential"):
            raise ValueError(f"network must be 'taylor' or 'sequential', got {network!r}.")
        if u_loss not in ("mean", "sum_of_parts"):
            raise ValueError(f"u_loss must be 'mean' or 'sum_of_parts', got {u_loss!r}.")
        self.save_hyperparameters()
        if network == "taylor":
            self.net = TaylorMLP(2, width, depth, activation="tanh")
        else:
            dims = [2] + [width] * depth
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(dims):
                layers += [nn.Linear(a, b), nn.Tanh()]
            layers.append(nn.Linear(dims[-1], 1))
            self.net = nn.Sequential(*layers)
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self.val_error = RelativeL2Error()

    def u(self, xt: torch.Tensor) -> torch.Tensor:
        """The network's prediction at points ``(x, t)``."""
        return self.net(self._scale(xt))

    def _scale(self, xt: torch.Tensor) -> torch.Tensor:
        return (xt - 0.5) / INPUT_STD if self.hparams.standardize_inputs else xt

    def residuals(self, batch):
        xt_u, g_u = batch["u"]
        xt_ut, xt_res = batch["ut"], batch["res"]
        if isinstance(self.net, TaylorMLP):
            # Streams are derivatives in the network's own (possibly standardized) coordinates.
            k = 1 / INPUT_STD if self.hparams.standardize_inputs else 1.0
            u_t = self.net.taylor(self._scale(xt_ut), first=[1])[1] * k
            d = self.net.taylor(self._scale(xt_res), second=[0, 1])
            u_tt, u_xx = d[1, 1] * k**2, d[0, 0] * k**2
        else:
            u_t = partial(self.u, xt_ut, 1)
            u_tt = partial(self.u, xt_res, 1, 1)
            u_xx = partial(self.u, xt_res, 0, 0)
        return {"u": self.u(xt_u) - g_u, "ut": u_t, "res": u_tt - C**2 * u_xx}

    def term_loss(self, term: str, residual: torch.Tensor) -> torch.Tensor:
        if term == "u" and self.hparams.u_loss == "sum_of_parts":
            # Rows come as [t = 0; x = 0; x = 1] in three equal parts (see _FreshPoints).
            return residual.reshape(3, -1, *residual.shape[1:]).square().flatten(1).mean(1).sum()
        return super().term_loss(term, residual)

    def validation_step(self, batch, batch_idx):
        xt, exact = batch
        self.val_error.update(self.u(xt), exact)
        self.log("val/rel_l2", self.val_error, prog_bar=True, batch_size=xt.shape[0])

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call: every rank must make it
        if self.trainer.is_global_zero and log_dir is not None and not self.trainer.fast_dev_run:
            save_figure(self, log_dir)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        hp = self.hparams
        if hp.staircase:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp.decay_steps, gamma=hp.decay_rate)
        else:
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=hp.decay_rate ** (1 / hp.decay_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def relative_l2_error(self, grid: int = 101) -> float:
        xt = _grid(grid).to(self.ntk_weights.device)
        exact = exact_solution(xt)
        return float((self.u(xt) - exact).norm() / exact.norm())


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
            # u rows: a third on t = 0, a third on x = 0, the rest on x = 1 (equal when n % 3 == 0).
            third = n // 3
            x0 = torch.rand(third, 1, generator=g)
            t_b = torch.rand(n - third, 1, generator=g)
            side = torch.cat([torch.zeros(third, 1), torch.ones(n - 2 * third, 1)])
            xt_u = torch.cat([torch.cat([x0, torch.zeros_like(x0)], dim=1), torch.cat([side, t_b], dim=1)])
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
    return lightning_cli(Wave1D, WaveData, args, run)


class _Progress(pl.Callback):
    """Prints step, relative L² error and the term weights every ``every`` steps."""

    def __init__(self, every: int, name: str) -> None:
        self.every, self.name = every, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            weights = ", ".join(f"λ_{k}={v:.4g}" for k, v in pl_module.term_weights.items())
            err = pl_module.relative_l2_error()
            print(f"  [{self.name}] step {step:>6}  rel. L2 {err:.3e}  {weights}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the paper's setting: 5×500, 80,000 steps, update every 1,000")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3, help="hidden layers")
    p.add_argument("--network", choices=["taylor", "sequential"], default="taylor")
    p.add_argument("--standardize-inputs", action="store_true", help="feed (x - 0.5)/σ, (t - 0.5)/σ to the network")
    p.add_argument("--u-loss", choices=["mean", "sum_of_parts"], default="mean", help="L_u over t=0, x=0, x=1")
    p.add_argument("--continuous-decay", action="store_true", help="lr·0.9^(step/1000) instead of a staircase")
    p.add_argument(
        "--authors-code",
        action="store_true",
        help="the authors' code conventions: --standardize-inputs --u-loss sum_of_parts --continuous-decay",
    )
    p.add_argument("--update-every", type=int, default=100, help="NTK weight update period, in steps")
    p.add_argument("--estimator", default="exact", help="exact, subsample, hutchinson, hutchpp, fd or auto")
    p.add_argument("--num-probes", type=int, default=None, help="probes per update for the sketches")
    p.add_argument("--trace-ema", type=float, default=0.0, help="averaging of trace estimates across updates")
    p.add_argument("--runs", choices=["both", "plain", "ntk"], default="both", help="which trainings to run")
    p.add_argument("--report-every", type=int, default=1000, help="print error and weights every n steps")
    p.add_argument("--logdir", default="lightning_logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    args = p.parse_args(argv)
    if args.paper:
        paper = {"width": 500, "depth": 5, "steps": 80_000, "update_every": 1000}
        for key, value in paper.items():
            if getattr(args, key) == p.get_default(key):  # flags given explicitly win over --paper
                setattr(args, key, value)
    if args.authors_code:
        args.standardize_inputs, args.u_loss, args.continuous_decay = True, "sum_of_parts", True
    return args


def train(args, use_ntk: bool) -> tuple[Wave1D, float]:
    pl.seed_everything(args.seed, verbose=False)
    model = Wave1D(
        args.width,
        args.depth,
        network=args.network,
        standardize_inputs=args.standardize_inputs,
        u_loss=args.u_loss,
        staircase=not args.continuous_decay,
    )
    name = "ntk" if use_ntk else "plain"
    callbacks: list[pl.Callback] = [_Progress(args.report_every, name)]
    if use_ntk:
        probes = (
            {}
            if args.num_probes is None
            else {"num_points" if args.estimator == "subsample" else "num_probes": args.num_probes}
        )
        callbacks.append(
            NTKWeightingCallback(
                args.update_every,
                estimator=as_estimator(args.estimator, **probes),
                trace_averager=TraceAverager(args.trace_ema) if args.trace_ema > 0 else None,
                seed=args.seed,
            )
        )
    trainer = make_trainer(args.steps, callbacks, args.logdir, "wave_1d", name, args.accelerator)
    start = time.perf_counter()
    trainer.fit(model, WaveData(seed=args.seed))
    return model, time.perf_counter() - start


def compare(argv=None) -> None:
    args = parse_args(argv)
    rows = []
    for use_ntk in (False, True):
        if args.runs != "both" and use_ntk != (args.runs == "ntk"):
            continue
        model, seconds = train(args, use_ntk)
        rows.append(("NTK weights" if use_ntk else "plain", model.relative_l2_error(), seconds, model.term_weights))
    print(f"\n{'run':<12} {'rel. L2 error':>14} {'time [s]':>9}   final weights")
    for name, err, seconds, w in rows:
        print(f"{name:<12} {err:14.3e} {seconds:9.1f}   " + ", ".join(f"{k}={v:.4g}" for k, v in w.items()))
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}/wave_1d")
    print(f"Figures (with the plot extra): {args.logdir}/wave_1d/{{plain,ntk}}/wave_1d.png")


def save_figure(model: Wave1D, log_dir: str, n: int = 101) -> str | None:
    """Saves prediction, exact solution and |error| on an n × n grid as ``<log_dir>/wave_1d.png``.

    Returns the path, or ``None`` when matplotlib (the ``plot`` extra) is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    xt = _grid(n).to(model.ntk_weights.device)
    with torch.no_grad():
        pred, exact = model.u(xt).reshape(n, n).cpu(), exact_solution(xt).reshape(n, n).cpu()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, data, title in zip(
        axes, (pred, exact, (pred - exact).abs()), ("prediction", "exact", "|error|"), strict=True
    ):
        im = ax.imshow(data.T, origin="lower", extent=(0, 1, 0, 1), aspect="auto")
        ax.set(xlabel="x", ylabel="t", title=title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"relative L² error {model.relative_l2_error(n):.3e}")
    fig.tight_layout()
    path = os.path.join(log_dir, "wave_1d.png")
    os.makedirs(log_dir, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "test", "predict", "--help", "-h", "--print_config"):
        cli_main()
    else:
        compare()

"""1-D Poisson with and without NTK loss weighting (Wang, Yu & Perdikaris 2022, §7.2).

    u_xx = f on [0, 1],  u(0) = u(1) = 0,  u = sin(4πx),  f = -16π² sin(4πx)

Trains the same network twice, with fixed unit weights ("plain") and with NTKWeightingCallback,
then prints the relative L² error of each, the final weights, and where the TensorBoard logs are.
With matplotlib installed (``pip install -e ".[plot]"``) each run also saves ``poisson_1d.png``
(prediction, exact solution and error) in its log directory.

    python examples/poisson_1d.py                 # the quick default (a few minutes on 2 CPU cores)
    python examples/poisson_1d.py --paper         # the paper's setting: width 100, NTK parameterization,
                                                  # full-batch GD with lr 1e-5, 40,000 steps
    python examples/poisson_1d.py --paper --init-only   # λ at initialization only
    python examples/poisson_1d.py fit --config examples/configs/poisson_1d_ntk.yaml   # LightningCLI

The boundary term has one row per boundary point. With the two distinct points x=0 and x=1
(``--boundary-copies 1``, the default) the exact traces at initialization of the paper's network
give λ_bc ≈ 100 as the paper reports; ``--boundary-copies 50`` (100 boundary rows, 50 copies of each
end) makes Tr K_bb 50× larger and λ_bc only ≈ 2–3.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pinn_runner import lightning_cli, make_trainer

from lightning_ntk import NTKWeightingCallback, PINNModule, TraceAverager, WeightRule, trace_weights
from lightning_ntk.derivatives import partial
from lightning_ntk.estimators import as_estimator
from lightning_ntk.metrics import RelativeL2Error
from lightning_ntk.traces import estimate_ntk_traces


def exact_solution(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(4 * math.pi * x)


def source(x: torch.Tensor) -> torch.Tensor:
    return -16 * math.pi**2 * torch.sin(4 * math.pi * x)


class NTKLinear(nn.Module):
    """A dense layer in NTK parameterization: ``W x / √fan_in + b`` with ``W, b ~ N(0, 1)``."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.randn(fan_out))
        self.scale = 1.0 / math.sqrt(fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.weight.T) + self.bias


class Standardize(nn.Module):
    """``(x − μ) / σ`` with fixed μ, σ: the input scaling of the authors' code (μ, σ of the residual points)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_mlp(width: int, depth: int, parameterization: str, standardize: bool = False) -> nn.Sequential:
    dims = [1] + [width] * depth + [1]
    layers: list[nn.Module] = [Standardize(0.5, math.sqrt(1 / 12))] if standardize else []
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        if parameterization == "ntk":
            layers.append(NTKLinear(a, b))
        else:
            layers.append(nn.Linear(a, b))
            if parameterization == "ntk_init":  # standard forward, W ~ N(0, 1/fan_in), b ~ N(0, 1)
                nn.init.normal_(layers[-1].weight, std=1 / math.sqrt(a))
                nn.init.normal_(layers[-1].bias)
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class Poisson1D(PINNModule):
    """Boundary term ``u(x_b)`` and residual term ``u_xx(x_r) - f(x_r)``.

    Args:
        width: Units per hidden layer (paper: 100).
        depth: Hidden layers (paper: 1).
        parameterization: ``"standard"`` (PyTorch's default init), ``"ntk"`` (``W x / √fan_in + b``,
            ``W, b ~ N(0, 1)``) or ``"ntk_init"`` (``W x + b``, ``W ~ N(0, 1/fan_in)``, ``b ~ N(0, 1)``).
        optimizer: ``"adam"`` or ``"gd"`` (full-batch gradient descent, as in the paper).
        lr: Learning rate (paper: 1e-5 with GD).
        loss_reduction: ``"mean"`` (L_i = mean r²) or ``"sum"`` (L_i = Σ r², N_i times larger
            gradients: the effective learning rate of each term scales with its point count).
        standardize_inputs: Feed ``(x − 0.5)/σ`` (σ = 1/√12) to the network, as the authors' code does.
    """

    def __init__(
        self,
        width: int = 50,
        depth: int = 2,
        parameterization: str = "standard",
        optimizer: str = "adam",
        lr: float = 1e-3,
        loss_reduction: str = "mean",
        standardize_inputs: bool = False,
    ) -> None:
        super().__init__(terms=["bc", "pde"])
        self.save_hyperparameters()
        self.net = make_mlp(width, depth, parameterization, standardize_inputs)
        self.val_error = RelativeL2Error()

    def validation_step(self, batch, batch_idx):
        x, exact = batch
        self.val_error.update(self.net(x), exact)
        self.log("val/rel_l2", self.val_error, prog_bar=True, batch_size=x.shape[0])

    def residuals(self, batch):
        x_b, x_r = batch
        return {"bc": self.net(x_b), "pde": partial(self.net, x_r, 0, 0) - source(x_r)}

    def term_loss(self, term, residual):
        return residual.square().sum() if self.hparams.loss_reduction == "sum" else residual.square().mean()

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call: every rank must make it
        if self.trainer.is_global_zero and log_dir is not None and not self.trainer.fast_dev_run:
            save_figure(self, log_dir)

    def configure_optimizers(self):
        if self.hparams.optimizer == "gd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def relative_l2_error(self, num_points: int = 1000) -> float:
        w = self.ntk_weights
        x = torch.linspace(0, 1, num_points, dtype=w.dtype, device=w.device).reshape(-1, 1)
        u, exact = self.net(x), exact_solution(x)
        return float((u - exact).norm() / exact.norm())


def save_figure(model: Poisson1D, log_dir: str, num_points: int = 1000) -> str | None:
    """Saves prediction vs exact solution and |error| as ``<log_dir>/poisson_1d.png``.

    Returns the path, or ``None`` when matplotlib (the ``plot`` extra) is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = torch.linspace(0, 1, num_points, dtype=model.ntk_weights.dtype, device=model.ntk_weights.device)
    with torch.no_grad():
        pred = model.net(x.reshape(-1, 1)).reshape(-1).cpu()
    x = x.cpu()
    exact = exact_solution(x)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(x, exact, "k-", label="exact")
    left.plot(x, pred, "r--", label="prediction")
    left.set(xlabel="x", ylabel="u", title=f"relative L² error {model.relative_l2_error(num_points):.3e}")
    left.legend()
    right.semilogy(x, (pred - exact).abs().clamp_min(1e-12))
    right.set(xlabel="x", ylabel="|error|", title="pointwise error")
    fig.tight_layout()
    path = os.path.join(log_dir, "poisson_1d.png")
    os.makedirs(log_dir, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class PoissonData(pl.LightningDataModule):
    """Full-batch training: the same boundary and residual points at every step, made in code.

    Args:
        steps: Batches per epoch (one per optimizer step).
        num_residual: Uniformly spaced residual points in [0, 1].
        boundary_copies: Rows per boundary end; 1 = the two distinct points x=0 and x=1.
    """

    def __init__(self, steps: int = 100_000, num_residual: int = 100, boundary_copies: int = 1) -> None:
        super().__init__()
        self.steps = steps
        self.x_b = torch.tensor([[0.0], [1.0]]).repeat_interleave(boundary_copies, dim=0)
        self.x_r = torch.linspace(0, 1, num_residual).reshape(-1, 1)

    @property
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_b, self.x_r

    def train_dataloader(self):
        return torch.utils.data.DataLoader([self.batch] * self.steps, batch_size=None)

    def val_dataloader(self):
        x = torch.linspace(0, 1, 1000, dtype=self.x_r.dtype).reshape(-1, 1)
        return torch.utils.data.DataLoader([(x, exact_solution(x))], batch_size=None)


def cli_main(args=None, run: bool = True):
    """``python examples/poisson_1d.py fit --config examples/configs/poisson_1d_ntk.yaml``."""
    return lightning_cli(Poisson1D, PoissonData, args, run)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the paper's setting (overrides the defaults below)")
    p.add_argument("--init-only", action="store_true", help="only print traces and λ at initialization")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument("--parameterization", choices=["standard", "ntk", "ntk_init"], default="standard")
    p.add_argument("--standardize-inputs", action="store_true", help="feed (x - 0.5)/σ to the network")
    p.add_argument("--optimizer", choices=["adam", "gd"], default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--num-residual", type=int, default=100)
    p.add_argument("--boundary-copies", type=int, default=1, help="rows per boundary end (1 = x=0 and x=1 once)")
    p.add_argument("--update-every", type=int, default=100, help="NTK weight update period, in steps")
    p.add_argument("--mode", choices=["trace", "mean_trace"], default="trace")
    p.add_argument("--ema", type=float, default=0.0, help="smoothing of the weights across updates")
    p.add_argument("--estimator", default="exact", help="exact, subsample, hutchinson, hutchpp, fd or auto")
    p.add_argument("--num-probes", type=int, default=None, help="probes per update for the sketches")
    p.add_argument("--trace-ema", type=float, default=0.0, help="averaging of trace estimates across updates")
    p.add_argument("--points-per-probe", type=int, default=None, help="fd: random points per term per probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default="lightning_logs")
    p.add_argument("--float64", action="store_true")
    p.add_argument("--runs", choices=["both", "plain", "ntk"], default="both", help="which trainings to run")
    p.add_argument("--loss-reduction", choices=["mean", "sum"], default="mean", help="L_i = mean or sum of r²")
    args = p.parse_args(argv)
    if args.paper:
        paper = {"width": 100, "depth": 1, "parameterization": "ntk", "optimizer": "gd", "lr": 1e-5, "steps": 40_000}
        for key, value in paper.items():
            if getattr(args, key) == p.get_default(key):  # flags given explicitly win over --paper
                setattr(args, key, value)
    return args


def build(args) -> tuple[Poisson1D, PoissonData]:
    pl.seed_everything(args.seed, verbose=False)
    model = Poisson1D(
        args.width,
        args.depth,
        args.parameterization,
        args.optimizer,
        args.lr,
        args.loss_reduction,
        args.standardize_inputs,
    )
    data = PoissonData(args.steps, args.num_residual, args.boundary_copies)
    if args.float64:
        model = model.double()
        data.x_b, data.x_r = data.x_b.double(), data.x_r.double()
    return model, data


def train(args, use_ntk: bool) -> tuple[Poisson1D, float, NTKWeightingCallback | None]:
    model, data = build(args)
    ntk = None
    if use_ntk:
        options = {}
        if args.num_probes is not None:
            options["num_points" if args.estimator == "subsample" else "num_probes"] = args.num_probes
        if args.points_per_probe is not None:
            options["points_per_probe"] = args.points_per_probe
        ntk = NTKWeightingCallback(
            update_every_n_steps=args.update_every,
            estimator=as_estimator(args.estimator, **options),
            weight_rule=WeightRule(mode=args.mode, ema=args.ema),
            trace_averager=TraceAverager(args.trace_ema) if args.trace_ema > 0 else None,
            seed=args.seed,
        )
    version = "ntk" if use_ntk else "plain"
    callbacks = [ntk] if ntk else []
    trainer = make_trainer(
        args.steps, callbacks, args.logdir, "poisson_1d", version, progress=getattr(args, "progress", False)
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    return model, time.perf_counter() - start, ntk


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, data = build(args)
    init = estimate_ntk_traces(model, data.batch)
    weights = trace_weights(init.traces, args.mode, init.num_rows)
    print(f"At initialization (N_bc={init.num_rows['bc']}, N_pde={init.num_rows['pde']}):")
    for name in model.terms:
        print(f"  Tr K_{name:<3} = {float(init.traces[name]):12.5g}   λ_{name} = {float(weights[name]):.4g}")
    if args.init_only:
        return

    quiet_lightning()
    args.progress = sys.stdout.isatty()  # a progress bar per run on a terminal; none in a log file
    rows, explain = [], ""
    for use_ntk in (False, True):
        if args.runs != "both" and use_ntk != (args.runs == "ntk"):
            continue
        name = "NTK weights" if use_ntk else "plain"
        print(f"\nTraining: {name}", flush=True)
        try:
            trained, seconds, ntk = train(args, use_ntk)
        except FloatingPointError as err:  # a diverging run is a result too
            rows.append(f"{name:<12} {'diverged':>14}   {str(err).splitlines()[0]}")
            continue
        weights = ", ".join(f"{k}={v:.4g}" for k, v in trained.term_weights.items())
        rows.append(f"{name:<12} {trained.relative_l2_error():14.3e} {seconds:9.1f}   {weights}")
        if ntk is not None and ntk.last_values:
            explain = why_the_weights_moved(ntk.last_values, init.traces, args.mode)
    print(f"\n{'run':<12} {'rel. L2 error':>14} {'time [s]':>9}   final weights")
    print("\n".join(rows))
    if explain:
        print(explain)
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}/poisson_1d")
    print(f"Figures (with the plot extra): {args.logdir}/poisson_1d/{{plain,ntk}}/poisson_1d.png")


def why_the_weights_moved(last: dict, initial: dict, mode: str) -> str:
    """Why λ_bc ends far from its value at initialization: the traces it is computed from moved."""
    if mode != "trace" or set(last) != {"bc", "pde"}:
        return ""
    b0, p0 = float(initial["bc"]), float(initial["pde"])
    b, p = float(last["bc"]), float(last["pde"])
    return (
        f"\nWhy λ_bc moved from {(b0 + p0) / b0:.3g} to {(b + p) / b:.4g}: λ_bc = (Tr K_bc + Tr K_pde) / Tr K_bc, "
        f"and at the last update Tr K_pde = {p:.4g} (was {p0:.4g}) while Tr K_bc = {b:.4g} (was {b0:.4g}).\n"
        "Training sharpens u'' (the PDE block grows) and the two boundary rows stay small, so the boundary term\n"
        "needs an ever larger weight to keep its share of the NTK: a large λ_bc here is the method working."
    )


def quiet_lightning() -> None:
    """Only this example's output and the progress bars: no Lightning banners, tips or warnings."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="torch")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "test", "predict", "--print_config"):
        cli_main()
    else:
        main()

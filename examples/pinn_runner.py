"""What the 2-D, nonlinear and vector-valued examples share: the weighting runs, training, reporting.

An example defines a :class:`GridPINN` subclass (residuals, the prediction ``u`` and a reference
solution on a fixed grid), a :class:`FreshPoints`-based data module, and calls :func:`main`. Every
example then offers the same runs, the same table and the same outputs:

- ``plain``: unit weights;
- ``ntk``: exact NTK trace weights every ``--update-every`` steps;
- ``ntk_fd``: NTK weights every step from the finite-difference sketch averaged over ~100 steps;
- ``grad_norm``: the gradient-norm rule of JAX-PI (after Wang, Teng & Perdikaris 2021) every
  ``--update-every`` steps with EMA 0.9 as in JAX-PI — *not* the NTK, for comparison;
- ``<run>+causal`` (time-dependent examples): the same weighting with causal training of the PDE
  term (:class:`~lightning_ntk.CausalWeighting`, ``--causal-chunks``, ``--causal-epsilon``).

Outputs: TensorBoard logs under ``<logdir>/<example>/<run>`` (losses, weights, traces or gradient
norms, ``val/rel_l2``), a PNG of prediction / reference / error per run (with matplotlib), and a
table of relative L² errors on the fixed grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_ntk import (
    AdaptiveCollocation,
    NTKGaussNewton,
    NTKWeightingCallback,
    PINNModule,
    TraceAverager,
    WeightRule,
)
from lightning_ntk.metrics import RelativeL2Error

WEIGHTINGS = ("plain", "ntk", "ntk_fd", "grad_norm")
CAUSAL = "+causal"
RUNS = WEIGHTINGS + tuple(w + CAUSAL for w in WEIGHTINGS)
LABELS = {
    "plain": "plain",
    "ntk": "NTK weights (exact)",
    "ntk_fd": "NTK weights per step (fd)",
    "grad_norm": "grad-norm weights",
}
LABELS.update({w + CAUSAL: f"{LABELS[w]} + causal" for w in WEIGHTINGS})


def weighting_callbacks(run: str, update_every: int, seed: int, ntk_mode: str = "trace") -> list[pl.Callback]:
    """The callbacks of one run (see the module docstring); ``+causal`` changes the module, not these.
    ``ntk_mode``: the :class:`WeightRule` mode of the NTK runs."""
    run = run.removesuffix(CAUSAL)
    if run == "plain":
        return []
    if run == "ntk":
        return [NTKWeightingCallback(update_every, weight_rule=WeightRule(mode=ntk_mode), seed=seed)]
    if run == "ntk_fd":
        rule = WeightRule(mode=ntk_mode)
        return [
            NTKWeightingCallback(1, estimator="fd", weight_rule=rule, trace_averager=TraceAverager(0.99), seed=seed)
        ]
    if run == "grad_norm":
        return [NTKWeightingCallback(update_every, estimator="grad_norm", weight_rule=WeightRule(ema=0.9), seed=seed)]
    raise ValueError(f"Unknown run {run!r}; choose from {RUNS}.")


class GridPINN(PINNModule):
    """A PINN whose accuracy is the relative L² error against a reference on a fixed grid.

    Subclasses set ``self.grid`` (points, ``(G, d)``) and ``self.reference`` (``(G, k)`` or ``(G,)``)
    as buffers, and implement ``u(points)`` (the fields compared with the reference) and
    ``residuals``. ``figure`` describes the PNG: ``(shape, extent, axis labels, field names)``;
    ``name`` names it.
    """

    figure: tuple[tuple[int, int], tuple[float, float, float, float], tuple[str, str], Sequence[str]]
    name: str  # the example's name: the PNG is <log dir>/<name>.png

    def u(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def relative_l2_error(self) -> float:
        metric = RelativeL2Error().to(self.grid.device)
        for chunk, ref in zip(self.grid.split(8192), self.reference.split(8192), strict=True):
            metric.update(self.u(chunk).reshape(ref.shape), ref)
        return float(metric.compute())

    def configure_optimizers(self):
        """Adam with the learning rate decayed smoothly by ``decay_rate`` every ``decay_steps`` steps
        (the subclass saves ``lr``, ``decay_rate`` and ``decay_steps`` as hyperparameters); with the
        hyperparameter ``optimizer="soap"`` SOAP (``pytorch-optimizer``) on the same schedule, with
        ``optimizer="gauss_newton"`` :class:`~lightning_ntk.NTKGaussNewton` from ``damping``."""
        hp = self.hparams
        optimizer = hp.get("optimizer", "adam")
        if optimizer not in ("adam", "soap", "gauss_newton"):
            raise ValueError(f"`optimizer` must be 'adam', 'soap' or 'gauss_newton', got {optimizer!r}.")
        if optimizer == "gauss_newton":
            return NTKGaussNewton(self, damping=hp.get("damping", 1e-3))
        if optimizer == "soap":
            from pytorch_optimizer import SOAP  # the examples extra: pip install -e ".[examples]"

            opt = SOAP(self.parameters(), lr=hp.lr, weight_decay=0.0)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=hp.decay_rate ** (1 / hp.decay_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective call: every rank must make it
        if self.trainer.is_global_zero and log_dir is not None and not self.trainer.fast_dev_run:
            save_figure(self, os.path.join(log_dir, f"{self.name}.png"))


class ErrorLogger(pl.Callback):
    """Logs ``val/rel_l2`` every ``every`` steps and at the end, and prints it with the weights."""

    def __init__(self, every: int, name: str, verbose: bool = True) -> None:
        self.every, self.name, self.verbose = every, name, verbose

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        err = pl_module.relative_l2_error()
        for logger in trainer.loggers:
            logger.log_metrics({"val/rel_l2": err}, step=step)
        if self.verbose:
            weights = ", ".join(f"λ_{k}={v:.3g}" for k, v in pl_module.term_weights.items())
            for term, cw in pl_module.causal.items():
                if cw.last_weights is not None:
                    weights += f", causal {term}: min w={float(cw.last_weights.min()):.3g} ε={cw.epsilon:g}"
            print(f"  [{self.name}] step {step:>6}  rel. L2 {err:.3e}  {weights}", flush=True)


class FreshPoints(torch.utils.data.IterableDataset):
    """An endless stream of batches ``sample(generator)``: fresh random points at every step, or with
    ``fixed`` the first batch at every step (one fixed collocation set)."""

    def __init__(self, sample: Callable[[torch.Generator], object], seed: int, fixed: bool = False) -> None:
        self.sample, self.seed, self.fixed = sample, seed, fixed

    def __iter__(self) -> Iterator[object]:
        g = torch.Generator().manual_seed(self.seed)
        batch = self.sample(g)
        while True:
            yield batch
            if not self.fixed:
                batch = self.sample(g)


class SampledPoints(pl.LightningDataModule):
    """Batches ``sample(generator)``: one fixed set for every step (``fixed``, default) or fresh every step."""

    def __init__(self, sample: Callable[[torch.Generator], object], seed: int = 0, fixed: bool = True) -> None:
        super().__init__()
        self.sample, self.seed, self.fixed = sample, seed, fixed

    def train_dataloader(self):
        return torch.utils.data.DataLoader(FreshPoints(self.sample, self.seed, self.fixed), batch_size=None)


class InitialBoundaryInteriorData(pl.LightningDataModule):
    """Fresh initial, boundary and interior points at every step, drawn by the subclass's ``sample``.

    Args:
        initial: Points on t = 0 per step.
        boundary: Boundary points per step.
        interior: Interior (collocation) points per step.
        seed: Seeds the point sampler.
        fixed: Draw the points once and train on that set at every step.
    """

    sample: Callable[[torch.Generator, int, int, int], dict[str, torch.Tensor]]

    def __init__(
        self, initial: int = 128, boundary: int = 64, interior: int = 256, seed: int = 0, fixed: bool = False
    ) -> None:
        super().__init__()
        self.initial, self.boundary, self.interior, self.seed = initial, boundary, interior, seed
        self.fixed = fixed

    def train_dataloader(self):
        sample = type(self).sample
        points = FreshPoints(lambda g: sample(g, self.initial, self.boundary, self.interior), self.seed, self.fixed)
        return torch.utils.data.DataLoader(points, batch_size=None)


def add_common_args(p: argparse.ArgumentParser, steps: int, update_every: int, causal: bool = False) -> None:
    """Options of every comparison; ``causal``: the example is time-dependent and offers ``+causal`` runs."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--update-every", type=int, default=update_every, help="weight update period (ntk, grad_norm)")
    choices = RUNS if causal else WEIGHTINGS
    p.add_argument("--runs", nargs="+", choices=choices, default=list(WEIGHTINGS), help="which weightings to train")
    if causal:
        p.add_argument("--causal-chunks", type=int, default=32, help="time chunks of the +causal runs")
        p.add_argument("--causal-epsilon", type=float, default=1.0, help="ε of the +causal runs")
    p.add_argument("--report-every", type=int, default=500, help="log and print the error every n steps")
    p.add_argument(
        "--ntk-mode",
        choices=["trace", "mean_trace"],
        default="trace",
        help="WeightRule mode of the NTK runs (mean_trace: JAX-PI's, per-point mean traces). The default here "
        "is trace, the setting of most tables in docs/results.md; NTKWeightingCallback's own default is "
        "mean_trace for modules with causal terms",
    )
    p.add_argument("--logdir", default="lightning_logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto")


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    """The optimizer of the comparison runs, their precision, and an optional wall-time budget with its curve."""
    p.add_argument(
        "--optimizer",
        choices=["adam", "soap", "gauss_newton"],
        default="adam",
        help="adam or soap (pytorch-optimizer's SOAP, the examples extra), both with the lr decayed; or gauss_newton "
        "(lightning_ntk.NTKGaussNewton; use with --precision 64-true)",
    )
    p.add_argument("--damping", type=float, default=1e-3, help="the first damping of gauss_newton")
    p.add_argument("--precision", default="32-true", help="Trainer precision, e.g. 64-true")
    p.add_argument("--seconds", type=float, default=0.0, help="stop each run after this much training time (0: off)")
    p.add_argument("--report-seconds", type=float, default=30.0, help="with --seconds: the error every this often")
    p.add_argument("--out", default=None, help="with --seconds: write the error curve here (JSON)")


def add_time_dependent_args(p: argparse.ArgumentParser, width: int, depth: int) -> None:
    """Options of the time-dependent examples: network size and parts, optimizer, points per step."""
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--depth", type=int, default=depth, help="hidden layers")
    add_optimizer_args(p)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--decay-steps", type=int, default=1000, help="lr × 0.9 every this many steps")
    p.add_argument(
        "--features",
        nargs="*",
        choices=["fourier", "rwf", "modified"],
        default=None,
        help="JAX-PI's network with these parts (see networks.py); not given: the tanh MLP",
    )
    p.add_argument("--fourier-scale", type=float, default=1.0)
    p.add_argument("--initial", type=int, default=128, help="initial points per step")
    p.add_argument("--boundary", type=int, default=64, help="boundary points per step")
    p.add_argument("--interior", type=int, default=256, help="PDE points per step")
    p.add_argument("--fixed-points", action="store_true", help="one fixed point set for every step (default: fresh)")
    p.add_argument(
        "--collocation",
        choices=["uniform", "rad", "ntk"],
        default="uniform",
        help="how the PDE points are drawn: uniform (fresh uniform points, the default), rad (residual-based) or "
        "ntk (residual × √NTK diagonal) from a scored pool (lightning_ntk.AdaptiveCollocation)",
    )
    p.add_argument("--collocation-every", type=int, default=100, help="steps between scorings of a fresh pool")
    p.add_argument("--pool-factor", type=int, default=8, help="pool size as a multiple of the PDE points per step")
    p.add_argument("--rad-a", type=float, default=1.0, help="sharpness a of the adaptive density")
    p.add_argument("--rad-c", type=float, default=1.0, help="uniform share c of the adaptive density")
    p.add_argument(
        "--importance",
        choices=["none", "traces", "loss"],
        default="loss",
        help="where the importance weights of adaptive points go",
    )


def time_dependent_options(args: argparse.Namespace) -> dict:
    """The model's keyword arguments from :func:`add_time_dependent_args` and the run's ``+causal``."""
    return {
        "width": args.width,
        "depth": args.depth,
        "lr": args.lr,
        "decay_steps": args.decay_steps,
        "features": args.features,
        "fourier_scale": args.fourier_scale,
        "causal_chunks": args.causal_chunks if getattr(args, "causal", False) else 0,
        "causal_epsilon": args.causal_epsilon,
        "optimizer": args.optimizer,
        "damping": args.damping,
    }


def tanh_mlp(width: int, depth: int, inputs: int = 2, outputs: int = 1) -> nn.Sequential:
    """``depth`` hidden tanh layers of ``width`` units: the network of most examples."""
    layers: list[nn.Module] = [nn.Linear(inputs, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, outputs))


def make_trainer(
    max_steps: int,
    callbacks: list[pl.Callback],
    logdir: str,
    name: str,
    version: str,
    accelerator: str = "cpu",
    progress: bool = False,
    precision: str = "32-true",
) -> pl.Trainer:
    """The Trainer of every example's comparison runs: TensorBoard logs under ``logdir/name/version``,
    no validation loop, no checkpoints."""
    return pl.Trainer(
        max_steps=max_steps,
        accelerator=accelerator,
        precision=precision,
        devices=1,
        callbacks=callbacks,
        logger=TensorBoardLogger(logdir, name=name, version=version, default_hp_metric=False),
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        log_every_n_steps=50,
    )


def collocation_callbacks(data: pl.LightningDataModule, args: argparse.Namespace) -> list[pl.Callback]:
    """``--collocation rad|ntk``: the PDE points drawn by :class:`~lightning_ntk.AdaptiveCollocation` from
    candidates of the data module's own interior sampler; ``uniform`` (default): the data module's points."""
    score = getattr(args, "collocation", "uniform")
    if score == "uniform":
        return []
    sample = type(data).sample

    def interior(g: torch.Generator, n: int) -> torch.Tensor:
        return sample(g, 0, 0, n)["pde"]

    adaptive = AdaptiveCollocation(
        {"pde": interior},
        score=score,
        every_n_steps=args.collocation_every,
        pool_factor=args.pool_factor,
        a=args.rad_a,
        c=args.rad_c,
        importance=args.importance,
        seed=args.seed,
    )
    return [adaptive]


def train(
    name: str, run: str, model: GridPINN, data: pl.LightningDataModule, args: argparse.Namespace
) -> tuple[GridPINN, float]:
    """Trains ``model`` with the weighting of ``run``; returns it and the wall time in seconds."""
    weighting = weighting_callbacks(run, args.update_every, args.seed, args.ntk_mode)
    callbacks = [ErrorLogger(args.report_every, run), *collocation_callbacks(data, args), *weighting]
    seconds = getattr(args, "seconds", 0.0)
    curve = ErrorCurve(seconds, args.report_seconds) if seconds else None
    if curve is not None:
        callbacks.append(curve)
    precision = getattr(args, "precision", "32-true")
    trainer = make_trainer(args.steps, callbacks, args.logdir, name, run, args.accelerator, precision=precision)
    start = time.perf_counter()
    trainer.fit(model, data)
    elapsed = time.perf_counter() - start
    if curve is not None and getattr(args, "out", None):
        write_curve(args.out, model, curve, {"run": run, "optimizer": args.optimizer, "seed": args.seed})
    return model, elapsed


def write_curve(path: str, model: GridPINN, curve: ErrorCurve, about: dict) -> None:
    """The error curve of a run and what it was, as JSON."""
    import json

    with open(path, "w") as f:
        json.dump({"example": model.name, **about, "curve": curve.points, "weights": model.term_weights}, f, indent=1)


def compare(
    name: str,
    build: Callable[[argparse.Namespace], tuple[GridPINN, pl.LightningDataModule]],
    args: argparse.Namespace,
) -> dict[str, tuple[float, float, dict[str, float]]]:
    """Trains every run in ``args.runs`` from the same initialization and prints the table."""
    results = {}
    for run in args.runs:
        pl.seed_everything(args.seed, verbose=False)
        args.causal = run.endswith(CAUSAL)  # what build() reads to make the PDE term causal
        model, data = build(args)
        model, seconds = train(name, run, model, data, args)
        results[run] = (model.relative_l2_error(), seconds, model.term_weights)
    print(f"\n{'run':<37} {'rel. L2 error':>14} {'time [s]':>9}   final weights")
    for run, (err, seconds, weights) in results.items():
        w = ", ".join(f"{k}={v:.4g}" for k, v in weights.items())
        print(f"{LABELS[run]:<37} {err:14.3e} {seconds:9.1f}   {w}")
    print(f"\nTensorBoard logs: tensorboard --logdir {args.logdir}/{name}")
    return results


def lightning_cli(model_class: type, data_class: type, args: list[str] | None = None, run: bool = True):
    """LightningCLI for an example; after ``fit`` it prints the result, as the comparison does."""
    from lightning.pytorch.cli import LightningCLI

    cli = LightningCLI(model_class, data_class, args=args, run=run, save_config_kwargs={"overwrite": True})
    if run and cli.subcommand == "fit" and cli.trainer.is_global_zero:
        weights = ", ".join(f"{k}={v:.4g}" for k, v in cli.model.term_weights.items())
        print(f"\nrelative L2 error {cli.model.relative_l2_error():.3e} after {cli.trainer.global_step} steps")
        print(f"final weights: {weights}")
        if cli.trainer.log_dir is not None:
            print(f"TensorBoard logs: tensorboard --logdir {cli.trainer.log_dir}")
    return cli


def cli_or_compare(cli: Callable[[], object], compare_main: Callable[[], object]) -> None:
    """``python example.py fit --config ...`` runs LightningCLI; anything else the comparison."""
    if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "--help", "-h", "--print_config"):
        cli()
    else:
        compare_main()


def save_figure(model: GridPINN, path: str) -> str | None:
    """Prediction, reference and |error| of every field on the grid; ``None`` without matplotlib."""
    shape, extent, labels, fields = model.figure
    with torch.no_grad():
        pred = model.u(model.grid).reshape(len(model.grid), -1).cpu()
    ref = model.reference.reshape(len(model.grid), -1).cpu()
    rows = [(field, pred[:, k].reshape(shape), ref[:, k].reshape(shape)) for k, field in enumerate(fields)]
    return save_panels(rows, extent, labels, f"relative L² error {model.relative_l2_error():.3e}", path)


def save_panels(
    rows: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    extent: tuple[float, float, float, float],
    labels: tuple[str, str],
    title: str,
    path: str,
) -> str | None:
    """One row of prediction, reference and |error| images per ``(field, prediction, reference)``
    (2-D arrays indexed ``[x, y]``); ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 3.4 * len(rows)), squeeze=False)
    for row, (field, pred, ref) in enumerate(rows):
        panels = (pred, ref, (pred - ref).abs())
        for ax, data, kind in zip(axes[row], panels, ("prediction", "reference", "|error|"), strict=True):
            im = ax.imshow(data.T.numpy(), origin="lower", extent=extent, aspect="auto")
            ax.set(xlabel=labels[0], ylabel=labels[1], title=f"{field}: {kind}")
            fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grid_2d(n_x: int, n_y: int, x: tuple[float, float], y: tuple[float, float]) -> torch.Tensor:
    """``(n_x·n_y, 2)`` points of a tensor grid, x-major (reshape to ``(n_x, n_y)``)."""
    gx, gy = torch.meshgrid(torch.linspace(*x, n_x), torch.linspace(*y, n_y), indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


class ErrorCurve(pl.Callback):
    """Records ``(seconds, step, error, extras)`` every ``every`` seconds of training and stops the fit after
    ``seconds`` of it; the time spent measuring the error is not counted (equal wall time means equal
    training time)."""

    def __init__(self, seconds: float, every: float, extra: dict[str, Callable[[], float]] | None = None) -> None:
        self.seconds, self.every, self.extra = seconds, every, extra or {}
        self.points: list[dict[str, float]] = []
        self._start = self._paused = 0.0
        self._next = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._paused, self._next = time.perf_counter(), 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        elapsed = now - self._start - self._paused
        done = elapsed >= self.seconds
        if elapsed >= self._next or done:
            point = {"seconds": elapsed, "step": trainer.global_step, "error": pl_module.relative_l2_error()}
            point.update({name: fn() for name, fn in self.extra.items()})
            self.points.append(point)
            extras = "  ".join(f"{k} {point[k]:.3e}" for k in self.extra)
            print(
                f"  t {elapsed:7.1f}s  step {trainer.global_step:>6}  rel. L2 {point['error']:.3e}  {extras}",
                flush=True,
            )
            self._next += self.every
            self._paused += time.perf_counter() - now
        if done:
            trainer.should_stop = True


def timed_fit(
    model: GridPINN, data: pl.LightningDataModule, args: argparse.Namespace, extra: dict | None = None
) -> dict:
    """Trains for ``args.seconds`` of wall time (``args.optimizer``; Adam with exact NTK weights every
    ``args.ntk_every`` steps), records the error curve, prints it and writes it to ``args.out`` (JSON)."""
    curve = ErrorCurve(args.seconds, args.report_seconds, extra)
    callbacks: list[pl.Callback] = [curve]
    if args.optimizer == "adam" and args.ntk_every > 0:
        callbacks.append(NTKWeightingCallback(args.ntk_every, seed=args.seed))
    trainer = pl.Trainer(
        max_steps=args.steps,
        precision=args.precision,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=TensorBoardLogger(args.logdir, name=model.name, version=f"{args.optimizer}-seed{args.seed}"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        log_every_n_steps=10,
    )
    trainer.fit(model, data)
    if args.out:
        write_curve(args.out, model, curve, {"optimizer": args.optimizer, "seed": args.seed})
    last = curve.points[-1]
    print(f"\n{args.optimizer}: rel. L2 error {last['error']:.3e} after {last['step']} steps, {last['seconds']:.0f} s")
    return {"optimizer": args.optimizer, "seed": args.seed, "curve": curve.points}


def timed_args(doc: str, seconds: float, width: int, depth: int, interior: int, boundary: int, argv=None):
    """The options of a wall-time comparison (:func:`timed_fit`): optimizer, budget, network, points."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", choices=["gauss_newton", "adam"], default="gauss_newton")
    p.add_argument("--seconds", type=float, default=seconds, help="wall time of training")
    p.add_argument("--steps", type=int, default=1_000_000, help="at most this many steps")
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--depth", type=int, default=depth)
    p.add_argument("--interior", type=int, default=interior)
    p.add_argument("--boundary", type=int, default=boundary)
    p.add_argument("--fresh", action="store_true", help="fresh points every step (default: one fixed set)")
    p.add_argument("--damping", type=float, default=1e-3, help="Gauss-Newton: the first damping")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam: learning rate (x 0.9 every 1,000 steps)")
    p.add_argument("--ntk-every", type=int, default=100, help="Adam: exact NTK weights every n steps (0: none)")
    p.add_argument("--precision", default="64-true")
    p.add_argument("--report-seconds", type=float, default=10.0, help="record the error every this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the error curve here (JSON)")
    p.add_argument("--logdir", default="lightning_logs")
    return p.parse_args(argv)

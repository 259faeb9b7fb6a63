"""What a `Trainer` adds to a tiny PINN step, and how much of that the package causes.

One process, one network (default 2×16 tanh, 32 points per term, the Poisson problem of `_problem.py`),
the same number of Adam steps in each run, each row run ``--repeats`` times interleaved (fastest shown):

- ``raw loop``: ``step_losses``, ``backward``, ``step`` in a Python loop (no Lightning);
- ``Trainer, bare module``: a LightningModule with the same loss and no ``self.log`` — Lightning's own cost;
- ``Trainer, PINNModule``: the package's module (logs each term's loss and the total every step);
- the same with a causal term, with a TensorBoard logger, and with ``capture_step=True``.

What the package causes is the PINNModule rows minus the bare-module row. Times are medians of step
intervals (from one ``on_train_batch_start`` to the next); host synchronisations per step are counted
(``lightning_ntk.counting.OpCounter``) in the package's own hooks.

    python benchmarks/lightning_overhead.py                     # 2×16, 32 points, autograd-style u_xx
    python benchmarks/lightning_overhead.py --width 256 --depth 3 --n 1024
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from _problem import AutogradPoisson, FastPoisson, make_batch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_ntk import CausalWeighting


class BareModule(pl.LightningModule):
    """The loss of ``model`` with nothing logged: what Lightning costs by itself."""

    def __init__(self, model: FastPoisson) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model.step_losses(batch).total

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class CausalPoisson(AutogradPoisson):
    """The Poisson problem with its pde term weighted causally along x (as if x were time)."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__(
            width,
            depth,
            causal={"pde": CausalWeighting(time_column=0, num_chunks=8, epsilon_schedule=[1e-2, 1e-1, 1.0])},
        )

    def residual_points(self, batch):
        return {"pde": batch[1].detach()}


class StepClock(pl.Callback):
    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def trainer_step_time(module: pl.LightningModule, batch, steps: int, logger=False) -> float:
    clock = StepClock()
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        callbacks=[clock],
        logger=logger,
        log_every_n_steps=50,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(module, loader)
    gaps = [b - a for a, b in zip(clock.starts[10:-1], clock.starts[11:], strict=False)]
    return statistics.median(gaps)


def raw_step_time(model: FastPoisson, batch, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model.step_losses(batch).total
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[10:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--n", type=int, default=32, help="points per term")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--style", choices=["helpers", "autograd"], default="autograd", help="how the residual takes u_xx")
    p.add_argument("--repeats", type=int, default=3, help="runs of each row, interleaved; the fastest is shown")
    args = p.parse_args(argv)
    batch = make_batch(args.n, torch.device("cpu"))

    base = AutogradPoisson if args.style == "autograd" else FastPoisson

    def fresh(cls=None, **options):
        torch.manual_seed(0)
        if cls is None:
            return base(args.width, args.depth, **options)
        return cls(args.width, args.depth, **options)

    def tensorboard(module):
        with tempfile.TemporaryDirectory() as logdir:
            return trainer_step_time(module, batch, args.steps, logger=TensorBoardLogger(logdir, name="overhead"))

    runs = {
        "raw loop (no Lightning)": lambda: raw_step_time(fresh(), batch, args.steps),
        "Trainer, bare module (no self.log)": lambda: trainer_step_time(BareModule(fresh()), batch, args.steps),
        "Trainer, PINNModule": lambda: trainer_step_time(fresh(), batch, args.steps),
        "Trainer, PINNModule, causal pde term": lambda: trainer_step_time(fresh(CausalPoisson), batch, args.steps),
        "Trainer, PINNModule, TensorBoard logger": lambda: tensorboard(fresh()),
        "Trainer, PINNModule(capture_step=True)": lambda: trainer_step_time(
            fresh(capture_step=True), batch, args.steps
        ),
    }
    rows = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            rows[name] = min(rows[name], run())
    raw = rows["raw loop (no Lightning)"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), MLP {args.depth}×{args.width} tanh, "
        f"N={args.n}, residual style: {args.style}"
    )
    print(f"{'run':<46}{'µs / step':>10}{'× raw':>8}")
    for name, t in rows.items():
        print(f"{name:<46}{t * 1e6:10.0f}{t / raw:8.2f}")


if __name__ == "__main__":
    main()

"""Time per optimizer step of plain training against training with NTKWeightingCallback.

All runs in one process on the same problem (1-D Poisson-type residual + boundary term, N points
per term, tanh MLP, Adam, full batch), through a real `lightning.pytorch.Trainer`. Each run takes
2n+1 steps; the time of steps 1 … 2n (from the start of step 1 to the start of step 2n+1) is
divided by 2n, so a run that updates every n steps pays for exactly two updates, as in a long run.

    python benchmarks/step_overhead.py                       # 3×256, N=1024, CPU
    python benchmarks/step_overhead.py --width 64            # a smaller network
    python benchmarks/step_overhead.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from _problem import FastPoisson, make_batch, sync

from lightning_ntk import NTKWeightingCallback


class StepClock(pl.Callback):
    """Timestamps the start of every training batch (placed before the NTK callback)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(self.device)
        self.starts.append(time.perf_counter())


def time_per_step(args, callback: NTKWeightingCallback | None, device: torch.device, model=None, batch=None) -> float:
    """Seconds per optimizer step of ``model`` (default: a fresh FastPoisson) through a Trainer."""
    torch.manual_seed(0)
    model = FastPoisson(args.width, args.depth) if model is None else model
    batch = make_batch(args.n, torch.device("cpu")) if batch is None else batch
    steps = 2 * args.every + 1
    loader = torch.utils.data.DataLoader([batch] * (steps + 1), batch_size=None)
    clock = StepClock(device)
    trainer = pl.Trainer(
        max_steps=steps + 1,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        callbacks=[clock] + ([callback] if callback else []),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, loader)
    return (clock.starts[steps] - clock.starts[1]) / (steps - 1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="points per term")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--every", type=int, default=100, help="update period of the exact run")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    runs = {
        "plain": None,
        "fd every step (1 probe, trace_ema=0.99)": NTKWeightingCallback(
            update_every_n_steps=1, estimator="fd", trace_ema=0.99, seed=0
        ),
        f"fd every step (1 probe on {args.n // 8} points)": NTKWeightingCallback(
            update_every_n_steps=1,
            estimator="fd",
            trace_ema=0.99,
            seed=0,
            estimator_options={"points_per_probe": args.n // 8},
        ),
        f"exact every {args.every} steps": NTKWeightingCallback(update_every_n_steps=args.every),
        f"hutchpp (9) every {args.every} steps": NTKWeightingCallback(
            update_every_n_steps=args.every, estimator="hutchpp", num_probes=9, seed=0
        ),
    }
    times = {name: time_per_step(args, cb, device) for name, cb in runs.items()}
    print(f"device={device} torch {torch.__version__}  N={args.n} per term  MLP {args.depth}x{args.width} tanh")
    print(f"{'run':<42}{'s / step':>10}{'× plain':>9}")
    for name, t in times.items():
        print(f"{name:<42}{t:10.4f}{t / times['plain']:9.2f}")


if __name__ == "__main__":
    main()

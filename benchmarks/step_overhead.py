"""Time per optimizer step of plain training against training with NTKWeightingCallback.

All runs in one process on the same problem (1-D Poisson-type residual + boundary term, N points
per term, tanh MLP, Adam, full batch), through a real `lightning.pytorch.Trainer`. Each run takes
2n+1 steps; the time of steps 1 … 2n (from the start of step 1 to the start of step 2n+1) is
divided by 2n, so a run that updates every n steps pays for exactly two updates, as in a long run.
The runs are repeated in rounds (``--repeats``, each round runs plain first); a ratio is the median
over rounds of a run's time over the plain run of its own round, so a slower stretch of a shared
machine moves both.

    python benchmarks/step_overhead.py                       # 3×256, N=1024, CPU
    python benchmarks/step_overhead.py --width 64            # a smaller network
    python benchmarks/step_overhead.py --style autograd      # u_xx by torch.autograd.grad
    python benchmarks/step_overhead.py --device cuda
    python benchmarks/step_overhead.py --runs fd --repeats 5   # only plain and per-step fd, five rounds
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from _problem import AutogradPoisson, FastPoisson, make_batch, sync

from lightning_ntk import FiniteDifference, HutchPlusPlus, NTKWeightingCallback, TraceAverager, ntk_traces

# The residual of the benchmark problem, written with lightning_ntk.derivatives (vmapped jvp) or in
# the ordinary autograd style (requires_grad_ + torch.autograd.grad).
MODELS = {"helpers": FastPoisson, "autograd": AutogradPoisson}


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
    model = MODELS[getattr(args, "style", "helpers")](args.width, args.depth) if model is None else model
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


# Each run besides plain: its label and how to build its callback (a fresh one per round).
RUNS = {
    "fd": (
        "fd every step, defaults (1 probe, auto points)",
        lambda args: NTKWeightingCallback(
            update_every_n_steps=1, estimator="fd", trace_averager=TraceAverager(0.99), seed=0
        ),
    ),
    "fd-all": (
        "fd every step, every point (points_per_probe=None)",
        lambda args: NTKWeightingCallback(
            update_every_n_steps=1,
            estimator=FiniteDifference(points_per_probe=None),
            trace_averager=TraceAverager(0.99),
            seed=0,
        ),
    ),
    "exact": ("exact every {every} steps", lambda args: NTKWeightingCallback(update_every_n_steps=args.every)),
    "hutchpp": (
        "hutchpp (9) every {every} steps",
        lambda args: NTKWeightingCallback(
            update_every_n_steps=args.every, estimator=HutchPlusPlus(num_probes=9), seed=0
        ),
    ),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1024, help="points per term")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--every", type=int, default=100, help="update period of the exact run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--style", choices=list(MODELS), default="helpers", help="how the residual takes u_xx")
    p.add_argument("--error-steps", type=int, default=300, help="per-step fd updates for the error report (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of runs; ratios are medians over rounds")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs besides plain")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = {key: label.format(every=args.every) for key, (label, _) in RUNS.items() if key in args.runs}
    times: dict[str, list[float]] = {key: [] for key in ["plain", *names]}
    for _ in range(args.repeats):
        for key in times:
            callback = None if key == "plain" else RUNS[key][1](args)
            times[key].append(time_per_step(args, callback, device))
    print(
        f"device={device} torch {torch.__version__}  N={args.n} per term  "
        f"MLP {args.depth}x{args.width} tanh  residual style: {args.style}  rounds: {args.repeats}"
    )
    print(f"{'run':<52}{'s / step':>10}{'× plain':>9}  (median; per round)")
    for key, label in {"plain": "plain", **names}.items():
        ratios = [t / plain for t, plain in zip(times[key], times["plain"], strict=True)]
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{label:<52}{statistics.median(times[key]):10.4f}{statistics.median(ratios):9.2f}  ({each})")
    if args.error_steps:
        print(
            f"\nRMS error (4 seeds) of the averaged fd trace after {args.error_steps} per-step updates, "
            "TraceAverager(0.99):"
        )
        for label, estimator, exact_start in (
            ("defaults, from exact (the callback's start)", FiniteDifference(), True),
            ("defaults, from the first estimate", FiniteDifference(), False),
            ("every point, from the first estimate", FiniteDifference(points_per_probe=None), False),
        ):
            errors = averaged_trace_error(args, estimator, args.error_steps, exact_start=exact_start)
            print(f"  {label:<44}" + "  ".join(f"{t}: {e:.3f}" for t, e in errors.items()) + "  (relative to exact)")


def averaged_trace_error(
    args, estimator, steps: int, beta: float = 0.99, seeds: int = 4, exact_start: bool = False
) -> dict[str, float]:
    """Root mean square over ``seeds`` runs of |TraceAverager(β) of ``steps`` estimates − exact| / exact,
    per term, on one fixed model and batch (no drift of the traces: only the sketch's error). With
    ``exact_start`` the average starts from the exact traces, as the callback does by default."""
    torch.manual_seed(0)
    model = MODELS[args.style](args.width, args.depth)
    batch = make_batch(args.n, torch.device("cpu"))
    exact = ntk_traces(model, batch)
    names = list(exact)
    squares = torch.zeros(len(names), dtype=torch.float64)
    for seed in range(seeds):
        averager = TraceAverager(beta)
        if exact_start:
            start = torch.stack([exact[n] for n in names])
            averager.update(start, torch.zeros_like(start))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            est = estimator(model, batch, generator)
            mean, _ = averager.update(torch.stack([est.traces[n] for n in names]))
        squares += (mean.double() / torch.stack([exact[n] for n in names]).double() - 1).square()
    return dict(zip(names, (squares / seeds).sqrt().tolist(), strict=True))


if __name__ == "__main__":
    main()

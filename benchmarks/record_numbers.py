"""Record every number short training runs produce, to show a refactor changes none of them.

Trains the Burgers example (a 2×16 JAX-PI network, 64 PDE points, 40 steps) with every weighting that
reaches the callback's main paths: exact traces, per-step ``fd`` with a ``TraceAverager``, gradient norms,
causal exact and causal ``fd``, and causal exact and ``fd`` with ``AdaptiveCollocation`` (RAD, importance
weights in the traces), each with ``NTKSpectrumMonitor``; stores every parameter, trace and weight.

    PYTHONPATH=. python benchmarks/record_numbers.py before.pt          # on the old commit (a worktree)
    PYTHONPATH=. python benchmarks/record_numbers.py after.pt --compare before.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import burgers_1d
from pinn_runner import collocation_callbacks, make_trainer, weighting_callbacks

from lightning_ntk import NTKSpectrumMonitor

RUNS = [
    ("ntk", "uniform"),
    ("ntk_fd", "uniform"),
    ("grad_norm", "uniform"),
    ("ntk+causal", "uniform"),
    ("ntk+causal", "rad"),
    ("ntk_fd+causal", "uniform"),
    ("ntk_fd+causal", "rad"),
]


def record(logdir: str) -> dict:
    out = {}
    for run, collocation in RUNS:
        argv = ["--steps", "40", "--width", "16", "--depth", "2", "--interior", "64", "--update-every", "5"]
        argv += ["--features", "fourier", "rwf", "modified", "--collocation", collocation]
        argv += ["--collocation-every", "7", "--importance", "traces"]
        args = burgers_1d.parse_args(argv)
        args.causal = run.endswith("+causal")
        pl.seed_everything(0, verbose=False)
        model, data = burgers_1d.build(args)
        callbacks = [*collocation_callbacks(data, args), *weighting_callbacks(run, 5, 0, "mean_trace")]
        ntk = callbacks[-1]
        trainer = make_trainer(40, [*callbacks, NTKSpectrumMonitor(every_n_steps=10, k=3)], logdir, "record", run)
        trainer.fit(model, data)
        out[f"{run}/{collocation}"] = {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "traces": ntk.last_values,
            "weights": ntk.last_weights,
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="where to save the numbers (torch.save)")
    p.add_argument("--compare", help="a file saved before: report which runs differ")
    p.add_argument("--logdir", default="lightning_logs")
    args = p.parse_args(argv)
    numbers = record(args.logdir)
    torch.save(numbers, args.out)
    if args.compare:
        before = torch.load(args.compare)
        for key, now in numbers.items():
            then = before[key]
            same = all(torch.equal(then["params"][n], now["params"][n]) for n in then["params"])
            same = same and then["traces"] == now["traces"] and then["weights"] == now["weights"]
            print(f"{key:28s} {'bit-identical' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()

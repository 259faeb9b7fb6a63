"""What float32 costs a Gauss–Newton run: the 2-D Poisson problem of ``examples/poisson_2d.py`` trained for the
same wall time with the model in float64 or float32, and ``K`` and the solve in float64 or float32.

    OMP_NUM_THREADS=1 python benchmarks/gauss_newton_precision.py --seconds 60
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from poisson_2d import Poisson2D, sample_points

from lightning_ntk import GaussNewtonWarning, NTKGaussNewton

SETTINGS = {
    "model float64, K float64": (torch.float64, torch.float64),
    "model float32, K float64": (torch.float32, torch.float64),
    "model float32, K float32": (torch.float32, torch.float32),
}


def run(model_dtype: torch.dtype, solve_dtype: torch.dtype, seconds: float, seed: int) -> tuple[float, int, int]:
    """(error at the end, steps, steps with no decrease) after ``seconds`` of Gauss–Newton steps."""
    torch.manual_seed(seed)
    model = Poisson2D().to(model_dtype)
    batch = {k: v.to(model_dtype) for k, v in sample_points(torch.Generator().manual_seed(seed), 900, 120).items()}
    opt = NTKGaussNewton(model, damping=1e-3, dtype=solve_dtype, condition_every=0)
    start, steps, stalled = time.perf_counter(), 0, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GaussNewtonWarning)
        while time.perf_counter() - start < seconds:
            opt.step(batch=batch)
            steps += 1
            stalled += not opt.last.accepted
    return model.double().relative_l2_error(), steps, stalled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = parser.parse_args(argv)
    print(f"2-D Poisson, tanh 2x32, 900 + 120 fixed points, {args.seconds:g} s per run, one thread")
    print(f"{'setting':<28} {'seed':>4} {'rel. L2':>10} {'steps':>6} {'no decrease':>12}")
    for name, (model_dtype, solve_dtype) in SETTINGS.items():
        for seed in args.seeds:
            error, steps, stalled = run(model_dtype, solve_dtype, args.seconds, seed)
            print(f"{name:<28} {seed:>4} {error:10.2e} {steps:6d} {stalled:12d}", flush=True)


if __name__ == "__main__":
    main()

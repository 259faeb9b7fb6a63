"""Which damping rule: Nielsen's (the default of ``NTKGaussNewton``) against Marquardt's classic one, on the
Kovasznay flow of ``examples/kovasznay_2d.py`` (3×32, 512 + 128 fixed points, float64), the same wall time each.

Marquardt: after a kept step ``μ ← μ/3`` when the gain ratio ``ρ > 0.25``, else ``μ ← 2μ``; rejected tries grow
``μ`` as in the default. Run the two rules side by side, one seed at a time, so both see the same load:

    OMP_NUM_THREADS=1 python benchmarks/gauss_newton_damping.py nielsen --seconds 150 --seed 0 &
    OMP_NUM_THREADS=1 python benchmarks/gauss_newton_damping.py marquardt --seconds 150 --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from kovasznay_2d import Kovasznay, sample_points

from lightning_ntk import NTKGaussNewton


class MarquardtGaussNewton(NTKGaussNewton):
    """``NTKGaussNewton`` with the classic Marquardt update of the damping after a kept step."""

    def _damped_step(self, system, batch):
        record = super()._damped_step(system, batch)
        if record.accepted:
            group = self.param_groups[0]
            shrunk = max(record.damping / 3, self.min_damping)
            group["damping"] = shrunk if record.gain_ratio > 0.25 else min(record.damping * 2, self.max_damping)
        return record


def run(rule: str, seconds: float, seed: int) -> tuple[float, int]:
    """(relative L² error of u, steps) after ``seconds`` of steps, the error evaluations not counted."""
    torch.manual_seed(seed)
    model = Kovasznay().double()
    batch = sample_points(torch.Generator().manual_seed(seed), 512, 128)
    opt = (MarquardtGaussNewton if rule == "marquardt" else NTKGaussNewton)(model, damping=1e-3, condition_every=0)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        opt.step(batch=batch)
        steps += 1
    return model.relative_l2_error(), steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rule", choices=["nielsen", "marquardt"])
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    error, steps = run(args.rule, args.seconds, args.seed)
    print(f"{args.rule:<10} seed {args.seed}  {steps} steps  rel. L2 of u {error:.3e}", flush=True)


if __name__ == "__main__":
    main()

"""What adaptive collocation costs per training step, as a ratio to a plain training step measured in the same run.

The model is the Burgers example in its best documented setting (3×64 JAX-PI network, Fourier features, RWF,
modified MLP; 128 initial + 64 boundary + 1,024 PDE points; causal PDE term). One scoring of a pool
(``pool_factor`` × 1,024 candidates, in chunks of ``chunk_size``) is timed against plain training steps
(residuals, weighted loss, backward, Adam), alternately, and so is one step's draw (multinomial over the
pool and the copy into the batch). The cost per training step at the schedule is
``scoring / every_n_steps + draw``.

    OMP_NUM_THREADS=1 python benchmarks/collocation_cost.py               # rad and ntk, defaults
    OMP_NUM_THREADS=1 python benchmarks/collocation_cost.py --every 50 --pool-factor 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from burgers_1d import Burgers1D, sample_points

from lightning_ntk import AdaptiveCollocation
from lightning_ntk.collocation import draw


def interior(g: torch.Generator, n: int) -> torch.Tensor:
    return sample_points(g, 0, 0, n)["pde"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, default=100, help="steps between scorings (the default schedule)")
    p.add_argument("--pool-factor", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps-per-repeat", type=int, default=10)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = Burgers1D(width=64, depth=3, features=["fourier", "rwf", "modified"], causal_chunks=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batch = sample_points(g, 128, 64, 1024)
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t), loggers=[], global_step=0, is_global_zero=True
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model.step_losses(batch).total
        loss.backward()
        opt.step()

    def timed(fn, repeat: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat

    rows = []
    for score in ("rad", "ntk"):
        cb = AdaptiveCollocation(
            {"pde": interior}, score=score, pool_factor=args.pool_factor, chunk_size=args.chunk_size, seed=0
        )
        cb.rng.start(torch.device("cpu"))  # what `setup` does (seed 0, rank 0)

        def scoring(cb=cb) -> None:
            cb.score_pools(trainer, model, batch)

        def drawing(cb=cb) -> None:
            target = batch["pde"]
            idx, _ = draw(cb.densities["pde"], target.shape[0], cb.generator)
            target.copy_(cb.pools["pde"][idx])

        scoring()  # warm: the exact path confirms its layout once per batch shape
        for _ in range(3):
            step()
        ratios_score, ratios_draw = [], []
        for _ in range(args.repeats):
            plain = timed(step, args.steps_per_repeat)
            ratios_score.append(timed(scoring) / plain)
            ratios_draw.append(timed(drawing, args.steps_per_repeat) / plain)
            plain_after = timed(step, args.steps_per_repeat)
            ratios_score[-1] *= plain / ((plain + plain_after) / 2)
        s, d = statistics.median(ratios_score), statistics.median(ratios_draw)
        rows.append((score, s, d, s / args.every + d))
    print(
        f"pool {args.pool_factor} × 1,024 points, chunks of {args.chunk_size}, scored every {args.every} steps; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(f"{'score':<6} {'one scoring [steps]':>20} {'one draw [steps]':>17} {'per training step [steps]':>26}")
    for score, s, d, total in rows:
        print(f"{score:<6} {s:20.2f} {d:17.3f} {total:26.3f}")


if __name__ == "__main__":
    main()

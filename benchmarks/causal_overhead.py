"""What causal weighting costs: training steps and NTK updates with and without a causal PDE term.

The Allen–Cahn example's JAX-PI formulation (periodic embedding, Fourier features, RWF, modified
MLP; ``u_t − 1e-4 u_xx − 5u + 5u³`` in the ordinary autograd style, an initial-condition term), the
same weights and points for every row, medians over repeats, each row also as a multiple of the plain
training step of the module without causal terms:

- a training step (loss, backward, Adam) without and with ``causal={"pde": CausalWeighting(...)}``;
- exact traces (Gram path), of the module and of the causal view (``CausalResiduals.freeze`` on the
  batch, which evaluates the residuals once more, then the traces of the scaled residuals);
- one ``fd`` estimate (the per-step sketch at its defaults), of the module and of the causal view.

    python benchmarks/causal_overhead.py                 # 64x3, 1024 PDE points, 128 initial
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from _problem import median_time, train_step_fn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from allen_cahn_1d import AllenCahn1D, sample_points

from lightning_ntk.causal import CausalResiduals
from lightning_ntk.estimators import exact_traces, finite_difference_traces


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--interior", type=int, default=1024)
    p.add_argument("--initial", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    features = ["fourier", "rwf", "modified"]
    plain = AllenCahn1D(args.width, args.depth, features=features)
    causal = AllenCahn1D(args.width, args.depth, features=features, causal_chunks=32)
    causal.load_state_dict(plain.state_dict())
    batch = sample_points(torch.Generator().manual_seed(1), args.initial, 0, args.interior)
    view = CausalResiduals(causal, causal.causal, causal.residual_points)
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(2)
    rows = {
        "training step": median_time(train_step_fn(plain, batch), args.repeats, cpu),
        "training step, causal PDE term": median_time(train_step_fn(causal, batch), args.repeats, cpu),
        "exact traces": median_time(lambda: exact_traces(plain, batch), args.repeats, cpu),
        "exact traces, causal (freeze + traces)": median_time(
            lambda: exact_traces(view.freeze(batch), batch), args.repeats, cpu
        ),
        "fd estimate": median_time(lambda: finite_difference_traces(plain, batch, generator=g), args.repeats, cpu),
        "fd estimate, causal (freeze + estimate)": median_time(
            lambda: finite_difference_traces(view.freeze(batch), batch, generator=g), args.repeats, cpu
        ),
    }
    paths = exact_traces(view.freeze(batch), batch).info["paths"]
    base = rows["training step"]
    print(
        f"Allen–Cahn, JAX-PI network {args.depth}x{args.width}, {args.interior} PDE + {args.initial} initial points, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, causal paths {paths}"
    )
    for name, seconds in rows.items():
        print(f"{name:<42} {seconds * 1e3:9.2f} ms  {seconds / base:6.2f} steps")


if __name__ == "__main__":
    main()

"""What does one exact NTK-trace computation cost, in training steps?

Problem: 1-D Poisson-type residual (u_xx - f) and a boundary-type term (u - g), N points per term,
tanh MLP of `depth` hidden layers × `width`. Times (medians over repeats, one process, one device):

- a plain training step: weighted loss, backward, Adam step;
- exact traces through the torch.func path (residual written with lightning_ntk.derivatives);
- exact traces of the same residual in the ordinary autograd style (per-point loop), timed on
  `--loop-points` points per term and scaled linearly to N (its cost is linear in the points).

    python benchmarks/exact_trace_cost.py                      # N=4096, 3×256, CPU
    python benchmarks/exact_trace_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _problem import AutogradPoisson, FastPoisson, median_time, train_step_fn

from lightning_ntk import ntk_traces
from lightning_ntk.estimators.exact import exact_traces


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="points per term")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--loop-points", type=int, default=64, help="points per term for the per-point loop timing")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = FastPoisson(args.width, args.depth).to(device)
    batch = (torch.rand(args.n, 1, device=device), torch.rand(args.n, 1, device=device))
    train_step = train_step_fn(model, batch)

    options = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}
    step = median_time(train_step, args.repeats, device)
    exact = median_time(lambda: ntk_traces(model, batch, **options), args.repeats, device)
    paths = exact_traces(model, batch, **options).info["paths"]

    slow = AutogradPoisson(args.width, args.depth).to(device)
    slow.load_state_dict(model.state_dict())
    m = min(args.loop_points, args.n)
    small = (batch[0][:m].clone(), batch[1][:m].clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop = median_time(lambda: ntk_traces(slow, small), max(1, args.repeats // 2), device) * args.n / m

    params = sum(p.numel() for p in model.parameters())
    print(f"device={device}  N={args.n} per term  MLP {args.depth}x{args.width} tanh  P={params}", end="  ")
    print(f"torch {torch.__version__}")
    print(f"exact paths: {paths}")
    print(f"{'computation':<44} {'median [s]':>11} {'× train step':>13}")
    print(f"{'plain training step (loss, backward, Adam)':<44} {step:11.4f} {1.0:13.2f}")
    print(f"{'exact traces, torch.func vmap path':<44} {exact:11.4f} {exact / step:13.2f}")
    print(f"{'exact traces, per-point autograd loop (est.)':<44} {loop:11.4f} {loop / step:13.2f}")
    print(f"vmap path is {loop / exact:.1f}x faster than the per-point loop")


if __name__ == "__main__":
    main()

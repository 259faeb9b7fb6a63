"""What ``lightning_ntk.derivatives`` costs. Two tables, each of two ways to compute the same thing:

1. ``u_xx`` of a tanh MLP (default 3×256, one input, one output) by ``partial`` in reverse mode (one output
   value per point, its default there) and in forward mode (what it takes for several values per point;
   forced by marking the network as one with several);
2. the Laplacian of the same MLP on two inputs by ``laplacian`` (one evaluation and one gradient per
   point, one more backward per dimension) and by the sum of two ``partial`` calls.

At several point counts, with the parameters frozen (as in an ``fd`` probe) and requiring gradients (as in
a training step: value and backward of ``Σ out²``). Medians of ``--repeats`` calls, milliseconds.

    OMP_NUM_THREADS=1 python benchmarks/derivatives_cost.py
    python benchmarks/derivatives_cost.py --width 64 --points 128 1024 4096
    python benchmarks/derivatives_cost.py --device cuda --points 1024 16384   # part of `make bench-gpu`
"""

from __future__ import annotations

import argparse
import copy

import torch
from _problem import median_time, mlp

from lightning_ntk import derivatives


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--points", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    reverse = mlp(args.width, args.depth).to(device)
    forward = copy.deepcopy(reverse)
    derivatives._remember_several_values(forward)  # the path of a network with several outputs
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {threads} thread(s)"
    print(f"torch {torch.__version__}, {where}; {args.depth}x{args.width} tanh MLPs")
    compare(
        "u_xx, one input: reverse mode vs forward mode",
        lambda x: derivatives.partial(reverse, x, 0, 0),
        lambda x: derivatives.partial(forward, x, 0, 0),
        (reverse, forward),
        1,
        args,
        device,
    )
    plane = mlp(args.width, args.depth, d=2).to(device)
    compare(
        "Laplacian, two inputs: laplacian() vs the sum of two partial() calls",
        lambda x: derivatives.laplacian(plane, x),
        lambda x: derivatives.partial(plane, x, 0, 0) + derivatives.partial(plane, x, 1, 1),
        (plane,),
        2,
        args,
        device,
    )


def compare(title: str, first, second, nets, d: int, args, device: torch.device) -> None:
    """Rows of median ms of ``first`` and ``second`` on ``d``-dimensional points, frozen and with the
    backward of ``Σ out²`` to the parameters, and the largest difference of their values."""
    print(f"\n{title}")
    print(f"{'points':>7}  {'parameters':<18}{'first [ms]':>13}{'second [ms]':>13}{'ratio':>7}  max |difference|")
    for n in args.points:
        x = torch.rand(n, d, device=device)
        for train in (False, True):
            for net in nets:
                net.requires_grad_(train)

            def call(fn, train=train, x=x):
                out = fn(x)
                if train:
                    out.square().sum().backward()
                return out

            diff = (call(first) - call(second)).abs().max().item()
            t_first = median_time(lambda: call(first), args.repeats, device)
            t_second = median_time(lambda: call(second), args.repeats, device)
            label = "with gradients" if train else "frozen"
            print(
                f"{n:>7}  {label:<18}{t_first * 1e3:13.2f}{t_second * 1e3:13.2f}{t_second / t_first:7.2f}  {diff:.1e}"
            )


if __name__ == "__main__":
    main()

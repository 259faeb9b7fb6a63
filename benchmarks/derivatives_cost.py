"""What ``lightning_ntk.derivatives.partial`` costs: reverse mode (one output value per point, the
default there) against forward mode (what it takes for several values per point), on one network.

``u_xx`` of a tanh MLP (default 3×256, one input, one output) at several point counts, with the
parameters frozen (as in an ``fd`` probe) and requiring gradients (as in a training step: value and
backward of ``Σ u_xx²``). Medians of ``--repeats`` calls, milliseconds; forward mode is forced by
marking the network as one with several values per point.

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
    print(f"torch {torch.__version__}, {where}; u_xx of a {args.depth}x{args.width} tanh MLP")
    print(f"{'points':>7}  {'parameters':<18}{'reverse [ms]':>13}{'forward [ms]':>13}{'ratio':>7}  max |difference|")
    for n in args.points:
        x = torch.rand(n, 1, device=device)
        for train in (False, True):
            for net in (reverse, forward):
                net.requires_grad_(train)

            def call(net=None, train=train, x=x):
                out = derivatives.partial(net, x, 0, 0)
                if train:
                    out.square().sum().backward()
                return out

            diff = (call(reverse) - call(forward)).abs().max().item()
            t_rev = median_time(lambda: call(reverse), args.repeats, device)
            t_fwd = median_time(lambda: call(forward), args.repeats, device)
            label = "with gradients" if train else "frozen"
            print(f"{n:>7}  {label:<18}{t_rev * 1e3:13.2f}{t_fwd * 1e3:13.2f}{t_fwd / t_rev:7.2f}  {diff:.1e}")


if __name__ == "__main__":
    main()

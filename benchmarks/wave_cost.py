"""Cost of the wave example's training step and exact NTK traces: TaylorMLP vs nn.Sequential.

The wave example (Wang et al. §7.3) with 300 fresh points per term, three terms (u, u_t, u_tt − 4u_xx),
for the two network choices of ``examples/wave_1d.py``: a ``TaylorMLP`` (derivatives from explicit
streams, exact traces by Gram identities) and an ``nn.Sequential`` (``derivatives.partial``: nested
``torch.func.grad``; exact traces by the same Gram path). Medians in one process; the ratio
"traces/step" is what one exact weight update costs in training steps.

    python benchmarks/wave_cost.py                     # 3×500, 5×500, 3×200, 3×100 on the CPU
    OMP_NUM_THREADS=1 python benchmarks/wave_cost.py   # one core, as the CPU reproduction runs
    python benchmarks/wave_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from _problem import median_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from wave_1d import Wave1D, _FreshPoints

from lightning_ntk import estimate_ntk_traces


def measure(network: str, width: int, depth: int, points: int, repeats: int, device: torch.device):
    """(step seconds, traces seconds, Jacobian paths) for one network."""
    torch.manual_seed(0)
    model = Wave1D(width, depth, network=network).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    raw = next(iter(_FreshPoints(points, seed=0)))
    batch = {k: tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) for k, v in raw.items()}

    def step():
        loss = sum(model.term_loss(k, r) for k, r in model.residuals(batch).items())
        opt.zero_grad()
        loss.backward()
        opt.step()

    def traces():
        return estimate_ntk_traces(model, batch)

    t_step = median_time(step, repeats, device, warmup=2)
    t_traces = median_time(traces, max(3, repeats // 2), device, warmup=1)
    return t_step, t_traces, "/".join(sorted(set(traces().info.get("paths", {}).values())))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="3x500,5x500,3x200,3x100", help="depth x width, comma separated")
    p.add_argument("--points", type=int, default=300)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, N={args.points} per term")
    print(f"{'network':<11} {'size':>6} {'step [ms]':>10} {'traces [ms]':>12} {'traces/step':>12}  path")
    for size, network in itertools.product(args.sizes.split(","), ("taylor", "sequential")):
        depth, width = (int(v) for v in size.split("x"))
        t_step, t_traces, path = measure(network, width, depth, args.points, args.repeats, device)
        print(f"{network:<11} {size:>6} {t_step * 1e3:10.1f} {t_traces * 1e3:12.1f} {t_traces / t_step:12.2f}  {path}")


if __name__ == "__main__":
    main()

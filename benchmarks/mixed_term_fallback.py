"""One point-mixing term among pointwise ones: exact traces, per-term fallback vs all terms off the Gram path.

A heat-type PINN in the ordinary autograd style with three terms (initial, boundary, PDE) of N
points each, 3×W tanh MLP, where the PDE residual subtracts its batch mean (its rows mix points, so
that term needs the ``rows`` path). Medians of exact-trace computations on the same weights and
points (paths remembered after a first call):

- default: the PDE term on ``rows``, the other terms on the Gram path (since this change);
- every term off the Gram path, as before this change (``paths=("vmap", "loop", "rows")``);
- the same module without the mean subtraction (every term on the Gram path), for scale;
- a plain training step, for scale.

    python benchmarks/mixed_term_fallback.py             # N=256, W=64
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _problem import median_time
from torch import nn

from lightning_ntk import PINNModule
from lightning_ntk.estimators.exact import exact_traces


class Heat(PINNModule):
    def __init__(self, width: int, depth: int, mix: bool) -> None:
        super().__init__(terms=["ic", "bc", "pde"])
        layers: list[nn.Module] = [nn.Linear(2, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.mix = mix

    def residuals(self, batch):
        xt = batch["res"].clone().requires_grad_(True)
        u = self.net(xt)
        du = torch.autograd.grad(u.sum(), xt, create_graph=True)[0]
        u_xx = torch.autograd.grad(du[:, 0].sum(), xt, create_graph=True)[0][:, 0]
        pde = du[:, 1] - 0.1 * u_xx
        return {
            "ic": self.net(batch["ic"]).squeeze(1) - torch.sin(torch.pi * batch["ic"][:, 0]),
            "bc": self.net(batch["bc"]).squeeze(1),
            "pde": pde - pde.mean() if self.mix else pde,
        }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256, help="points per term")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batch = {k: torch.rand(args.n, 2, generator=g) for k in ("ic", "bc", "res")}
    mixing, pointwise = Heat(args.width, args.depth, True), Heat(args.width, args.depth, False)
    pointwise.load_state_dict(mixing.state_dict())
    warnings.simplefilter("ignore")

    def step():
        opt = torch.optim.Adam(pointwise.parameters(), lr=0.0)
        loss = pointwise.step_losses(batch).total
        loss.backward()
        opt.step()
        opt.zero_grad()

    rows = {
        "plain training step (pointwise module)": median_time(step, args.repeats, torch.device("cpu")),
        "exact traces, every term on the Gram path (pointwise module)": median_time(
            lambda: exact_traces(pointwise, batch), args.repeats, torch.device("cpu")
        ),
    }
    rows["exact traces, default: only 'pde' off the Gram path"] = median_time(
        lambda: exact_traces(mixing, batch), args.repeats, torch.device("cpu")
    )
    rows["exact traces, every term off the Gram path (before)"] = median_time(
        lambda: exact_traces(mixing, batch, paths=("vmap", "loop", "rows")), args.repeats, torch.device("cpu")
    )
    paths = exact_traces(mixing, batch).info["paths"]
    step_time = rows["plain training step (pointwise module)"]
    print(f"N={args.n} per term, {args.depth}x{args.width} tanh, torch {torch.__version__}, paths now: {paths}")
    for name, seconds in rows.items():
        print(f"{name:<62} {seconds:9.4f} s  {seconds / step_time:9.1f} steps")


if __name__ == "__main__":
    main()

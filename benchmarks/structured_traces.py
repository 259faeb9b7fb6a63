"""Exact NTK traces for a TaylorMLP PINN: structured (Gram identities) vs torch.func vs JAX-PI.

Problem: a Poisson-type residual (Laplacian of u minus a source) and a boundary-type term, N points
each, TaylorMLP with `depth` hidden tanh layers of `width` units, d-dimensional inputs. Times in
one process, as medians: a plain training step (weighted loss, backward, Adam), exact traces by the
structured path, the same by the general torch.func path, the JAX-PI way when jax is installed (1-D
only), and a training step preceded by exact traces at every step (through the callback's code path).

    python benchmarks/structured_traces.py                    # W=256, N=4096, d=1 and d=2, CPU
    python benchmarks/structured_traces.py --device cuda
"""

from __future__ import annotations

import argparse
import copy

import torch
from _problem import median_time, sync
from trace_estimators import jax_pi_time

from lightning_ntk import PINNModule, estimate_ntk_traces, trace_weights
from lightning_ntk.jacobian import _generic_norms
from lightning_ntk.taylor import TaylorMLP


class TaylorPoisson(PINNModule):
    def __init__(self, d: int, width: int, depth: int) -> None:
        super().__init__(terms=["bc", "pde"])
        self.net = TaylorMLP(d, width, depth)
        self.d = d

    def residuals(self, batch):
        x_b, x_r = batch
        derivs = self.net.taylor(x_r, second=list(range(self.d)))
        lap = sum(derivs[i, i] for i in range(self.d))
        return {"bc": self.net(x_b), "pde": lap + 1.0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"device={device} torch {torch.__version__}  N={args.n} per term  TaylorMLP {args.depth}x{args.width} tanh")
    print(f"{'d':>2} {'computation':<44}{'median [s]':>11}{'× step':>8}")
    for d in args.dims:
        torch.manual_seed(0)
        model = TaylorPoisson(d, args.width, args.depth).to(device)
        g = torch.Generator().manual_seed(0)
        batch = (torch.rand(args.n, d, generator=g).to(device), torch.rand(args.n, d, generator=g).to(device))
        train_model = copy.deepcopy(model)
        opt = torch.optim.Adam(train_model.parameters(), lr=1e-3)

        def step(m=train_model, o=opt, b=batch):
            o.zero_grad(set_to_none=True)
            loss, _ = m.weighted_loss(b)
            loss.backward()
            o.step()

        def step_with_exact(m=train_model, o=opt, b=batch):
            est = estimate_ntk_traces(m, b)  # what the callback does before the forward
            m.set_term_weights(torch.stack([w for w in trace_weights(est.traces).values()]).to(m.ntk_weights))
            step(m, o, b)

        t_step = median_time(step, args.repeats, device)
        est = estimate_ntk_traces(model, batch)
        assert set(est.info["paths"].values()) == {"structured"}, est.info["paths"]
        t_struct = median_time(lambda m=model, b=batch: estimate_ntk_traces(m, b), args.repeats, device)
        t_func = median_time(
            lambda m=model, b=batch: _generic_norms(m, b, chunk_size=None, terms=None, reference=None, indices=None),
            max(1, args.repeats // 2),
            device,
        )
        generic = _generic_norms(model, batch, chunk_size=None, terms=None, reference=None, indices=None)
        rel = max(abs(float(est.traces[k] / generic.norms[k].sum()) - 1) for k in est.traces)
        t_both = median_time(step_with_exact, args.repeats, device)
        sync(device)
        rows = [
            ("plain training step", t_step),
            ("exact traces, structured (Gram identities)", t_struct),
            ("exact traces, torch.func vmap path", t_func),
            ("training step + exact weights every step", t_both),
        ]
        if d == 1:
            jax_model = _as_plain_mlp(model)
            result = jax_pi_time(jax_model, tuple(t.cpu() for t in batch), args.repeats) if jax_model else None
            if result is not None:
                rows.append(("JAX-PI jit(vmap(grad)) (same weights, points)", result[0]))
        for name, t in rows:
            print(f"{d:>2} {name:<44}{t:11.4f}{t / t_step:8.2f}")
        print(f"{d:>2} structured vs torch.func traces: max relative difference {rel:.1e}")


def _as_plain_mlp(model: TaylorPoisson):
    """The TaylorMLP's weights in the nn.Sequential form that trace_estimators.jax_pi_time reads."""
    layers = []
    for i, lin in enumerate(model.net.layers):
        layers.append(lin)
        if i < len(model.net.layers) - 1:
            layers.append(torch.nn.Tanh())
    holder = torch.nn.Module()
    holder.net = torch.nn.Sequential(*layers).cpu()
    return holder


if __name__ == "__main__":
    main()

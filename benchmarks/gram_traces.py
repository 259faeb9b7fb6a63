"""Exact NTK traces of an ordinary autograd-style PINN: the Gram path against the per-point paths.

One process, the same weights and points for every row: a 3×256 tanh ``nn.Sequential`` with the
Laplacian taken by ``torch.autograd.grad(create_graph=True)`` (the way most PINN code is written),
N points per term (residual + boundary term), d = 1 and 2. Rows, as medians:

- a plain training step (weighted loss, backward, Adam);
- exact traces by the default (Gram) path, of the autograd-style residual;
- exact traces by the ``vmap`` path (the same network written with ``lightning_ntk.derivatives``);
- exact traces by the ``loop`` path (autograd style; timed on ``--loop-points`` points, scaled to N);
- the JAX-PI way, jit(vmap(grad)) (d = 1, when jax is installed: ``pip install -e ".[bench]"``);
- per optimizer step through a Trainer with ``NTKWeightingCallback(update_every_n_steps=1)``
  (exact weights every step) and without it (``--trainer-steps`` steps each).

    python benchmarks/gram_traces.py                     # CPU, N=4096, d=1 and 2
    python benchmarks/gram_traces.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from _problem import AutogradPoisson, FastPoisson, make_batch, median_time, train_step_fn
from step_overhead import time_per_step
from trace_estimators import jax_pi_time

from lightning_ntk import NTKWeightingCallback
from lightning_ntk.estimators.exact import exact_traces


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="points per term")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--dims", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loop-points", type=int, default=64)
    p.add_argument("--trainer-steps", type=int, default=10, help="steps per Trainer run (0: skip)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"device={device} torch {torch.__version__}  N={args.n} per term  MLP {args.depth}x{args.width} tanh")
    print(f"{'d':>2} {'computation':<52}{'median [s]':>11}{'× step':>8}")
    for d in args.dims:
        torch.manual_seed(0)
        model = AutogradPoisson(args.width, args.depth, d=d).to(device)
        helpers = FastPoisson(args.width, args.depth, d=d).to(device)
        helpers.load_state_dict(model.state_dict())
        batch = make_batch(args.n, device, d=d)
        t_step = median_time(train_step_fn(model, batch), args.repeats, device)
        gram = exact_traces(model, batch)
        assert set(gram.info["paths"].values()) == {"gram"}, gram.info["paths"]
        t_gram = median_time(lambda m=model, b=batch: exact_traces(m, b), args.repeats, device)
        t_vmap = median_time(lambda m=helpers, b=batch: exact_traces(m, b, paths=("vmap",)), 1, device)
        via_vmap = exact_traces(helpers, batch, paths=("vmap",))
        m = min(args.loop_points, args.n)
        small = tuple(t[:m].clone() for t in batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_loop = median_time(lambda m_=model, s=small: exact_traces(m_, s, paths=("loop",)), 1, device) * args.n / m
        rows = [
            ("plain training step", t_step),
            ("exact traces, gram path (autograd-style residual)", t_gram),
            ("exact traces, vmap path (lightning_ntk.derivatives)", t_vmap),
            ("exact traces, loop path (autograd style, scaled)", t_loop),
        ]
        if d == 1:
            result = jax_pi_time(copy.deepcopy(model).cpu(), tuple(t.cpu() for t in batch), args.repeats)
            if result is not None:
                rows.append(("JAX-PI jit(vmap(grad)), same weights and points", result[0]))
        if args.trainer_steps:
            options = argparse.Namespace(every=args.trainer_steps // 2, n=args.n, width=args.width, depth=args.depth)
            cpu_batch = tuple(t.cpu() for t in batch)
            plain = time_per_step(options, None, device, copy.deepcopy(model).cpu(), cpu_batch)
            every = NTKWeightingCallback(update_every_n_steps=1)
            weighted = time_per_step(options, every, device, copy.deepcopy(model).cpu(), cpu_batch)
            rows.append(("Trainer: plain, per step", plain))
            rows.append(("Trainer: NTKWeightingCallback(update_every_n_steps=1)", weighted))
            print(f"{d:>2} callback every step / plain Trainer step: {weighted / plain:.2f}")
        for name, t in rows:
            print(f"{d:>2} {name:<52}{t:11.4f}{t / t_step:8.2f}")
        rel = max(abs(float(gram.traces[k] / via_vmap.traces[k]) - 1) for k in gram.traces)
        print(f"{d:>2} gram vs vmap traces: max relative difference {rel:.1e}")


if __name__ == "__main__":
    main()

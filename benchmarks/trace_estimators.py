"""Time and accuracy of every NTK trace estimator against the exact traces.

Problem: 1-D Poisson-type residual (u_xx − f) and boundary-type term (u), N points per term, tanh
MLP `depth` × `width` (default 3 × 256). For each N: the exact traces (default path, Gram), the
per-point autograd loop (ordinary-style residual re-evaluated per point, the package's fallback;
timed on `--loop-points` points and scaled linearly to N), the naive loop (one
``torch.autograd.grad`` per residual row through the full-batch graph; timed on 32 rows per term
and scaled), optionally the JAX-PI way (jit of vmap of grad of the per-point residual, if jax
is installed), and every sketch with `--probes` probes: median time, time as a fraction of exact,
and relative error of each term's trace (one seeded draw, with the reported standard error).

    python benchmarks/trace_estimators.py                         # N = 1024 and 4096, CPU
    python benchmarks/trace_estimators.py --device cuda
    python benchmarks/trace_estimators.py --n 1024 --probes 4 16   # quicker
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _problem import AutogradPoisson, FastPoisson, make_batch, median_time, sync, train_step_fn

from lightning_ntk import estimate_ntk_traces, ntk_traces

SKETCHES = ("subsample", "hutchinson", "hutchpp", "fd")


def jax_pi_time(model: FastPoisson, batch, repeats: int) -> tuple[float, dict[str, float]] | None:
    """Exact NTK diagonal sums the JAX-PI way, on the same weights and points (None without jax).

    Returns the median time and JAX's traces, to check that both sides compute the same numbers."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    import math
    import time

    jax.config.update("jax_enable_x64", False)  # float32, as the torch model
    layers = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    params = [
        (jnp.asarray(m.weight.detach().cpu().numpy()), jnp.asarray(m.bias.detach().cpu().numpy())) for m in layers
    ]

    def u(p, x):  # x: scalar point
        h = jnp.reshape(x, (1,))
        for w, b in p[:-1]:
            h = jnp.tanh(w @ h + b)
        w, b = p[-1]
        return (w @ h + b)[0]

    def r_pde(p, x):
        u_xx = jax.grad(jax.grad(u, argnums=1), argnums=1)(p, x)
        return u_xx + 16 * math.pi**2 * jnp.sin(4 * math.pi * x)

    def sq_norm(g):
        return sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(g))

    @jax.jit
    def traces(p, xb, xr):
        tb = jax.vmap(lambda x: sq_norm(jax.grad(u)(p, x)))(xb).sum()
        tr = jax.vmap(lambda x: sq_norm(jax.grad(r_pde)(p, x)))(xr).sum()
        return tb, tr

    xb = jnp.asarray(batch[0].detach().cpu().numpy()[:, 0])
    xr = jnp.asarray(batch[1].detach().cpu().numpy()[:, 0])
    tb, tr = jax.block_until_ready(traces(params, xb, xr))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(traces(params, xb, xr))
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], {"bc": float(tb), "pde": float(tr)}


def naive_row_loop_time(model: AutogradPoisson, batch, rows: int, device) -> float:
    """One ``torch.autograd.grad`` per residual row through the full-batch graph (the common way),
    timed on ``rows`` rows per term and scaled to all rows."""
    import time

    params = [q for q in model.parameters() if q.requires_grad]
    residuals = model.residuals(batch)
    total = 0.0
    for r in residuals.values():
        flat = r.reshape(-1)
        k = min(rows, flat.numel())
        sync(device)
        start = time.perf_counter()
        for i in range(k):
            grads = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
            sum(g.square().sum() for g in grads if g is not None)
        sync(device)
        total += (time.perf_counter() - start) * flat.numel() / k
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--probes", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats of the cheap computations")
    p.add_argument("--loop-points", type=int, default=128)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FastPoisson(args.width, args.depth).to(device)
    slow = AutogradPoisson(args.width, args.depth).to(device)
    slow.load_state_dict(model.state_dict())
    params = sum(q.numel() for q in model.parameters())
    print(f"device={device} torch {torch.__version__}  MLP {args.depth}x{args.width} tanh  P={params}")

    for n in args.n:
        batch = make_batch(n, device)
        step = median_time(train_step_fn(model, batch), args.repeats, device)
        exact_est = estimate_ntk_traces(model, batch)
        exact = {k: float(v) for k, v in exact_est.traces.items()}
        t_exact = median_time(lambda b=batch: ntk_traces(model, b), max(1, args.repeats // 2), device, warmup=0)
        # (estimate_ntk_traces above was the warm-up)
        m = min(args.loop_points, n)
        small = (batch[0][:m].clone(), batch[1][:m].clone())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_loop = median_time(lambda s=small: ntk_traces(slow, s), 1, device) * n / m
        t_rows = naive_row_loop_time(slow, batch, 32, device)
        jax_result = jax_pi_time(model, batch, args.repeats)

        print(f"\nN = {n} points per term; exact traces bc={exact['bc']:.5g} pde={exact['pde']:.5g}")
        print(f"one training step: {step:.4f} s")
        head = ("estimator", "probes", "time [s]", "/exact", "/step", "err bc", "err pde", "stderr pde")
        print("{:<22}{:>7}{:>10}{:>8}{:>8}{:>9}{:>9}{:>11}".format(*head))
        label = f"exact ({'/'.join(sorted(set(exact_est.info['paths'].values())))})"
        print(f"{label:<22}{'':>7}{t_exact:10.3f}{1.0:8.3f}{t_exact / step:8.1f}{0.0:9.1%}{0.0:9.1%}{'':>11}")
        print(f"{'per-point loop (est.)':<22}{'':>7}{t_loop:10.3f}{t_loop / t_exact:8.3f}{t_loop / step:8.1f}")
        print(f"{'naive row loop (est.)':<22}{'':>7}{t_rows:10.3f}{t_rows / t_exact:8.3f}{t_rows / step:8.1f}")
        if jax_result is not None:
            t_jax, jax_traces = jax_result
            jerr = {k: abs(jax_traces[k] / exact[k] - 1) for k in exact}
            print(
                f"{'JAX-PI jit(vmap(grad))':<22}{'':>7}{t_jax:10.4f}{t_jax / t_exact:8.3f}{t_jax / step:8.1f}"
                f"{jerr['bc']:9.2%}{jerr['pde']:9.2%}   (JAX's traces vs ours)"
            )
        for name in SKETCHES:
            for k in args.probes:
                g = torch.Generator(device=device).manual_seed(k)
                probes = {"num_points" if name == "subsample" else "num_probes": k}  # subsample's probes are points
                est = estimate_ntk_traces(model, batch, name, generator=g, **probes)
                reps = args.repeats if k <= 16 else 1
                t = median_time(lambda b=batch, nm=name, o=probes: ntk_traces(model, b, nm, **o), reps, device, 0)
                # (the seeded draw above was the warm-up)
                err = {t_: abs(float(est.traces[t_]) / exact[t_] - 1) for t_ in exact}
                rel_se = float(est.stderr["pde"]) / exact["pde"]
                cells = (name, k, t, t / t_exact, t / step, err["bc"], err["pde"], rel_se)
                print("{:<22}{:7d}{:10.3f}{:8.3f}{:8.1f}{:9.2%}{:9.2%}{:11.2%}".format(*cells))


if __name__ == "__main__":
    main()

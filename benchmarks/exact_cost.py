"""What warm exact traces cost, against a plain training step of the same network: time, aten ops,
host synchronisations and backward passes.

Three cases, each in one process on the same weights and points, residuals in the ordinary autograd
style (``requires_grad_`` + ``torch.autograd.grad(create_graph=True)``):

- ``1d-256``: 1-D Poisson ``u_xx`` + a boundary term, 3×256 tanh, N=4,096 points per term;
- ``1d-64``: the same at 3×64, N=1,024;
- ``2d-2out``: a 2-D two-output gradient flow (Q-tensor type: ``p_t = L Δp − a p − 2c(p²+q²)p``, the
  same for ``q``), 4×128 tanh on periodic inputs, 1,024 pde + 256 ic points, residuals of shape (N, 2);
- ``2d-flow``: steady incompressible Navier–Stokes (Kovasznay flow, Re = 40), three outputs ``(u, v, p)``,
  four terms: x-momentum, y-momentum and continuity (each one scalar per point, second derivatives by
  ``torch.autograd.grad``) on 2,048 interior points and the velocity ``(u, v)`` on 512 boundary points;
  4×128 tanh.

Rows per case: the plain step (weighted loss, backward, Adam) and warm exact traces and ``fd``
(first calls done before timing), as medians of CPU time, and the median of the ratios of each call to
the step timed just before it (the two alternate, so a slower stretch of a shared machine moves both); aten ops
dispatched, host synchronisations and backward passes (``torch.autograd.grad`` calls made by the
package) per warm call, counted under a ``TorchDispatchMode``; and minor page faults per call (median; the
step's a mean over its own timed calls): a call that holds more memory than the step makes the allocator
give pages back to the system after it and fault them in again on the next call, which costs system time.

    OMP_NUM_THREADS=1 python benchmarks/exact_cost.py               # every case, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/exact_cost.py --breakdown --repeats 15   # where the time goes
    python benchmarks/exact_cost.py --cases 2d-2out --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
from _problem import AutogradPoisson, make_batch, mlp, train_step_fn

import lightning_ntk.jacobian.gram as gram
from lightning_ntk import PINNModule
from lightning_ntk.counting import BackwardCounter, OpCounter
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.estimators.finite_difference import finite_difference_traces


class QTensor2d(PINNModule):
    """``p_t = L Δp − a p − 2c (p² + q²) p`` and the same for ``q`` on the periodic unit square.

    Inputs ``(t, x, y)``; x and y enter through ``cos, sin(2π·)``; outputs ``(p, q)``; terms ``ic``
    (the state at t = 0) and ``pde``, both of shape (N, 2).
    """

    def __init__(self, width: int = 128, depth: int = 4, L: float = 1e-3, a: float = -1.0, c: float = 1.0) -> None:
        super().__init__(terms=["ic", "pde"])
        self.net = mlp(width, depth, d=5, d_out=2)
        self.L, self.a, self.c = L, a, c

    def field(self, txy: torch.Tensor) -> torch.Tensor:
        t, x, y = txy[:, :1], txy[:, 1:2], txy[:, 2:3]
        k = 2 * math.pi
        return self.net(torch.cat([t, torch.cos(k * x), torch.sin(k * x), torch.cos(k * y), torch.sin(k * y)], 1))

    def residuals(self, batch):
        xy0, target0, txy = batch
        u0 = self.field(torch.cat([torch.zeros_like(xy0[:, :1]), xy0], 1))
        txy = txy.clone().requires_grad_(True)
        u = self.field(txy)
        rows = []
        for c in range(2):
            g = torch.autograd.grad(u[:, c].sum(), txy, create_graph=True)[0]
            u_xx = torch.autograd.grad(g[:, 1].sum(), txy, create_graph=True)[0][:, 1]
            u_yy = torch.autograd.grad(g[:, 2].sum(), txy, create_graph=True)[0][:, 2]
            rows.append(g[:, 0] - self.L * (u_xx + u_yy) + self.a * u[:, c])
        bulk = 2 * self.c * (u.square().sum(1, keepdim=True)) * u
        return {"ic": u0 - target0, "pde": torch.stack(rows, 1) + bulk}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class SteadyFlow2d(PINNModule):
    """Steady incompressible Navier–Stokes, ``(u·∇)u + ∇p − ν Δu = 0`` and ``∇·u = 0``, in the ordinary
    autograd style: one network ``(x, y) → (u, v, p)``, three interior terms on the same points and the
    velocity on the boundary."""

    def __init__(self, width: int = 128, depth: int = 4, nu: float = 1 / 40) -> None:
        super().__init__(terms=["momentum_x", "momentum_y", "continuity", "boundary"])
        self.net = mlp(width, depth, d=2, d_out=3)
        self.nu = nu

    def residuals(self, batch):
        xy_b, uv_b, xy = batch
        xy = xy.clone().requires_grad_(True)
        u, v, p = self.net(xy).unbind(1)

        def grad(f):
            return torch.autograd.grad(f.sum(), xy, create_graph=True)[0]

        du, dv, dp = grad(u), grad(v), grad(p)
        u_xx, u_yy = grad(du[:, 0])[:, 0], grad(du[:, 1])[:, 1]
        v_xx, v_yy = grad(dv[:, 0])[:, 0], grad(dv[:, 1])[:, 1]
        return {
            "momentum_x": u * du[:, 0] + v * du[:, 1] + dp[:, 0] - self.nu * (u_xx + u_yy),
            "momentum_y": u * dv[:, 0] + v * dv[:, 1] + dp[:, 1] - self.nu * (v_xx + v_yy),
            "continuity": du[:, 0] + dv[:, 1],
            "boundary": self.net(xy_b)[:, :2] - uv_b,
        }

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def kovasznay(xy: torch.Tensor, re: float = 40.0) -> torch.Tensor:
    """The exact Kovasznay velocity ``(u, v)`` at ``xy``."""
    lam = re / 2 - math.sqrt(re**2 / 4 + 4 * math.pi**2)
    x, y = xy[:, 0], xy[:, 1]
    e = torch.exp(lam * x)
    return torch.stack([1 - e * torch.cos(2 * math.pi * y), lam / (2 * math.pi) * e * torch.sin(2 * math.pi * y)], 1)


def flow_batch(n_interior: int = 2048, n_boundary: int = 512, seed: int = 0):
    """Points on ``[-0.5, 1] × [-0.5, 1.5]``: the boundary's four sides in equal shares, then the interior."""
    g = torch.Generator().manual_seed(seed)
    low, high = torch.tensor([-0.5, -0.5]), torch.tensor([1.0, 1.5])
    s = torch.rand(n_boundary, generator=g)
    side = torch.arange(n_boundary) % 4
    unit = torch.stack([torch.where(side < 2, s, side.eq(3).float()), torch.where(side < 2, side.float(), s)], 1)
    xy_b = low + unit * (high - low)
    return xy_b, kovasznay(xy_b), low + torch.rand(n_interior, 2, generator=g) * (high - low)


def qtensor_batch(n_pde: int = 1024, n_ic: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xy0 = torch.rand(n_ic, 2, generator=g)
    k = 2 * math.pi
    target = torch.stack([torch.cos(k * xy0[:, 0]) * torch.sin(k * xy0[:, 1]), torch.sin(k * xy0[:, 0])], 1)
    return xy0, 0.5 * target, torch.rand(n_pde, 3, generator=g)


def cases() -> dict[str, tuple[PINNModule, object]]:
    torch.manual_seed(0)
    return {
        "1d-256": (AutogradPoisson(256, 3), make_batch(4096, torch.device("cpu"))),
        "1d-64": (AutogradPoisson(64, 3), make_batch(1024, torch.device("cpu"))),
        "2d-2out": (QTensor2d(128, 4), qtensor_batch()),
        "2d-flow": (SteadyFlow2d(128, 4), flow_batch()),
    }


def cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def page_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing, as on Windows)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_median(fn, repeats: int) -> float:
    fn()
    return statistics.median(cpu_time(fn) for _ in range(repeats))


def faults_of(fn) -> int:
    before = page_faults()
    fn()
    return page_faults() - before


def paired(fn, step, repeats: int) -> tuple[float, float, float]:
    """Median CPU time of ``fn``, the median ratio to ``step`` (the two timed alternately), and the median
    page faults of a call of ``fn`` (memory the allocator gave back to the system and takes again)."""
    fn()
    step()
    times, ratios, faults = [], [], []
    for _ in range(repeats):
        t_step = cpu_time(step)
        before = page_faults()
        t = cpu_time(fn)
        faults.append(page_faults() - before)
        times.append(t)
        ratios.append(t / t_step)
    return statistics.median(times), statistics.median(ratios), statistics.median(faults)


def count(fn) -> tuple[OpCounter, int]:
    """Ops of one warm call of ``fn``, and the ``torch.autograd.grad`` calls the package made in it."""
    fn()
    with OpCounter() as ops, BackwardCounter("lightning_ntk") as backwards:
        fn()
    return ops, backwards.calls


def step_phases(model, batch, repeats: int) -> dict[str, float]:
    """Median CPU seconds of a plain step's forward (weighted loss), backward and optimizer step."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows = []
    for i in range(repeats + 1):
        t0 = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = model.step_losses(batch).total
        t1 = time.process_time()
        loss.backward()
        t2 = time.process_time()
        opt.step()
        t3 = time.process_time()
        if i:  # the first step warms up
            rows.append({"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


# What a warm exact call spends its time on: the functions of the Gram path that do each part.
PHASES = {
    "evaluation": (gram, "evaluate_plainly"),
    "walk": (gram.walking, "walk_uses"),
    "backwards": (gram.cuts, "backward"),
    "Gram products": (gram, "term_norms"),
}


def exact_phases(model, batch, repeats: int) -> dict[str, float]:
    """Median CPU seconds of a warm exact call's phases (:data:`PHASES`) and the rest of the call."""
    spent: dict[str, float] = {}
    saved = {name: getattr(owner, attr) for name, (owner, attr) in PHASES.items()}

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.process_time() - start

        return call

    for name, (owner, attr) in PHASES.items():
        setattr(owner, attr, timed(name, saved[name]))
    rows = []
    try:
        exact_traces(model, batch)
        for _ in range(repeats):
            spent.clear()
            total = cpu_time(lambda: exact_traces(model, batch))
            rows.append({**{name: spent.get(name, 0.0) for name in PHASES}, "rest": total - sum(spent.values())})
    finally:
        for name, (owner, attr) in PHASES.items():
            setattr(owner, attr, saved[name])
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def print_breakdown(name: str, model, batch, repeats: int) -> None:
    step = step_phases(model, batch, repeats)
    exact = exact_phases(model, batch, repeats)
    parts = lambda d: ", ".join(f"{k} {v * 1e3:.2f}" for k, v in d.items())  # noqa: E731
    print(f"{name:<9}step [ms]: {parts(step)} (sum {sum(step.values()) * 1e3:.2f})")
    print(f"{'':<9}exact [ms]: {parts(exact)} (sum {sum(exact.values()) * 1e3:.2f})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(cases()))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--breakdown", action="store_true", help="where a step's and a warm exact call's time goes")
    args = p.parse_args(argv)
    if args.breakdown:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU ms, medians of {args.repeats}")
        for name, (model, batch) in cases().items():
            if name in args.cases:
                print_breakdown(name, model, batch, args.repeats)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU seconds, medians of {args.repeats}")
    print(
        f"{'case':<9}{'computation':<16}{'median [s]':>11}{'× step':>8}{'aten ops':>10}{'× step':>8}{'syncs':>7}"
        f"{'backwards':>11}{'faults':>8}"
    )
    for name, (model, batch) in cases().items():
        if name not in args.cases:
            continue
        step = train_step_fn(model, batch)
        generator = torch.Generator().manual_seed(0)
        calls = {
            "training step": step,
            "exact traces": lambda m=model, b=batch: exact_traces(m, b),
            "fd (1 probe)": lambda m=model, b=batch, g=generator: finite_difference_traces(m, b, generator=g),
        }
        t_step = cpu_median(step, args.repeats)
        step_faults = statistics.median(faults_of(step) for _ in range(3))
        ops_step = count(step)[0].total
        for what, fn in calls.items():
            t, ratio, faults = (t_step, 1.0, step_faults) if fn is step else paired(fn, step, args.repeats)
            counter, grads = count(fn)
            print(
                f"{name:<9}{what:<16}{t:11.4f}{ratio:8.2f}{counter.total:10d}{counter.total / ops_step:8.2f}"
                f"{counter.syncs:7d}{grads:11d}{faults:8.0f}"
            )


if __name__ == "__main__":
    main()

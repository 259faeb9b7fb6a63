"""What one Gauss–Newton step costs, phase by phase, against the floor of its own arithmetic.

The problem is the Kovasznay flow of ``examples/kovasznay_2d.py`` (u, v, p; three interior terms in the
ordinary autograd style and a two-column boundary term), float64, one fixed batch. Per row count ``m``:

- phases of a step: the Jacobian rows (one residual evaluation and the Gram path's backwards), ``K = J Jᵀ``
  (``symmetric_gram``: the row blocks on and above the diagonal), the solve (Cholesky of ``K + μI`` and the
  triangular solves), ``Jᵀα``, and one try (a residual evaluation for the gain ratio); the whole
  ``NTKGaussNewton.step`` (one try kept);
- the floor: one GEMM ``J Jᵀ`` of the same shape and one Cholesky of an ``m × m`` matrix, timed in the same run;
- a plain Adam step of the same module and batch (loss, backward, update), and the memory of ``J`` and ``K``;
- the matrix-free route (``solver="cg"``): one conjugate-gradient solve at ``μ = 1e-3`` and ``1e-6`` on the
  freshly initialized network (tolerance 1e-10), its time and iterations (``--no-cg`` skips it).

Medians over ``--repeats`` calls after one warm-up.

    OMP_NUM_THREADS=1 python benchmarks/gauss_newton_cost.py                       # 3x32 (m 1,792), 3x64 (m 4,000)
    OMP_NUM_THREADS=1 python benchmarks/gauss_newton_cost.py --rows 1000 2000 4000 8000 --width 32 --depth 3
    python benchmarks/gauss_newton_cost.py --device cuda --dtype float32     # on a GPU (make bench-gpu)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from kovasznay_2d import Kovasznay, sample_points

from lightning_ntk import NTKGaussNewton
from lightning_ntk.gauss_newton import gauss_newton_system, loss_rows, symmetric_gram
from lightning_ntk.gauss_newton_matrix_free import matrix_free_system
from lightning_ntk.jacobian.full import residual_jacobian

DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def points_for(rows: int) -> tuple[int, int]:
    """Interior and boundary points giving about ``rows`` residual rows (3 per interior, 2 per boundary point,
    one boundary point per four interior ones)."""
    interior = max(4, round(rows / 3.5))
    return interior, max(4, (interior // 4) // 4 * 4)


def case(width: int, depth: int, rows: int, repeats: int, dtype: torch.dtype, cg: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = Kovasznay(width, depth).to(DEVICE, dtype)
    interior, boundary = points_for(rows)
    batch = {
        k: v.to(DEVICE, dtype) for k, v in sample_points(torch.Generator().manual_seed(0), interior, boundary).items()
    }
    measured, _ = loss_rows(model, batch)
    system = gauss_newton_system(model, batch)
    m, p = system.jacobian.shape
    out = {"m": m, "P": p}
    out["rows"] = median_seconds(lambda: residual_jacobian(measured, batch, model.terms), repeats)
    out["K"] = median_seconds(lambda: symmetric_gram(system.jacobian), repeats)

    def solve():
        damped = system.kernel.clone()
        damped.diagonal().add_(1e-3)
        factor = torch.linalg.cholesky(damped)
        return torch.cholesky_solve(system.residual.unsqueeze(1), factor)

    alpha = solve().squeeze(1)
    out["solve"] = median_seconds(solve, repeats)
    out["J^T a"] = median_seconds(lambda: system.jacobian.T @ alpha, repeats)
    out["try"] = median_seconds(lambda: system.loss_now(batch), repeats)
    opt = NTKGaussNewton(model, damping=1e3, condition_every=0)  # large damping: the first try is kept

    def gn_step():
        opt.param_groups[0]["damping"] = 1e3
        opt.step(batch=batch)

    out["step"] = median_seconds(gn_step, repeats)
    out["J+K MiB"] = (m * p + m * m) * 8 / 2**20
    if cg:
        free = matrix_free_system(model, batch, tolerance=1e-10, max_iterations=20_000)
        for damping in (1e-3, 1e-6):
            out[f"cg {damping:g}"] = median_seconds(lambda d=damping: free.solve(d), 1)
            out[f"its {damping:g}"] = free.iterations
    a = torch.randn(m, p, dtype=torch.float64, device=DEVICE)
    out["floor GEMM"] = median_seconds(lambda: a @ a.T, repeats)
    spd = a @ a.T
    spd.diagonal().add_(1.0)
    out["floor Cholesky"] = median_seconds(lambda: torch.linalg.cholesky(spd), repeats)
    adam = torch.optim.Adam(model.parameters(), lr=1e-6)

    def adam_step():
        adam.zero_grad()
        model.step_losses(batch).total.backward()
        adam.step()

    out["adam step"] = median_seconds(adam_step, repeats)
    return out


COLUMNS = ["rows", "K", "solve", "J^T a", "try", "step", "floor GEMM", "floor Cholesky", "adam step"]
CG_COLUMNS = ["cg 0.001", "its 0.001", "cg 1e-06", "its 1e-06"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["32x3:1792", "64x3:4000"], help="WIDTHxDEPTH:ROWS")
    parser.add_argument("--rows", nargs="+", type=int, default=None, help="row counts for --width/--depth")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="the model's dtype")
    parser.add_argument("--no-cg", action="store_true", help="skip the matrix-free solves")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    specs = [(args.width, args.depth, r) for r in args.rows] if args.rows else []
    for spec in [] if args.rows else args.cases:
        net, rows = spec.split(":")
        width, depth = net.split("x")
        specs.append((int(width), int(depth), int(rows)))
    where = f"{torch.get_num_threads()} thread(s)" if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE)
    print(f"torch {torch.__version__}, {where}, model {args.dtype}, K float64; seconds (median)")
    cg_columns = [] if args.no_cg else CG_COLUMNS
    header = f"{'net':>6} {'m':>6} {'P':>6} " + " ".join(f"{c:>10}" for c in COLUMNS)
    print(header + f" {'step/floor':>10} {'step/adam':>10} {'J+K MiB':>8} " + " ".join(f"{c:>10}" for c in cg_columns))
    results = []
    for width, depth, rows in specs:
        r = case(width, depth, rows, args.repeats, dtype, not args.no_cg)
        floor = r["floor GEMM"] + r["floor Cholesky"]
        cells = " ".join(f"{r[c]:10.4f}" for c in COLUMNS)
        ratios = f"{r['step'] / floor:10.2f} {r['step'] / r['adam step']:10.1f} {r['J+K MiB']:8.0f}"
        cg_cells = " ".join(f"{r[c]:10.4g}" for c in cg_columns)
        print(f"{width}x{depth:<4} {r['m']:6d} {r['P']:6d} {cells} {ratios} {cg_cells}", flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()

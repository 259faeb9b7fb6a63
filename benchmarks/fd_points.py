"""How many points a one-probe ``fd`` estimate needs: the spread of the estimate against its cost.

For three PINNs (the 1-D Poisson problem of ``step_overhead.py`` with the vmapped
``lightning_ntk.derivatives`` residual, 3×256, N=1,024 per term; the steady 2-D flow and the
two-output 2-D gradient flow of ``exact_cost.py``) and three point counts per term (the ``"auto"``
default ``max(64, ⌈N_i/16⌉)``, the earlier default ``max(64, ⌈N_i/8⌉)``, and every point), it draws
``--draws`` one-probe estimates on fixed weights and prints, per term, the relative standard deviation
and the relative bias (mean / exact − 1, whose standard error is the spread over √draws) of the
estimates, and the milliseconds per estimate. Every row of a case uses the same seed, so rows that
subsample see the same directions and differ only in the points.

    OMP_NUM_THREADS=1 python benchmarks/fd_points.py
    python benchmarks/fd_points.py --draws 300 --cases poisson
"""

from __future__ import annotations

import argparse
import time

import torch
from _problem import FastPoisson, make_batch
from exact_cost import QTensor2d, SteadyFlow2d, flow_batch, qtensor_batch

import lightning_ntk.estimators.finite_difference as fd
from lightning_ntk import ntk_traces

CASES = {
    "poisson": lambda: (FastPoisson(256, 3), make_batch(1024, torch.device("cpu"))),
    "2d-flow": lambda: (SteadyFlow2d(), flow_batch()),
    "2d-2out": lambda: (QTensor2d(), qtensor_batch()),
}

# Label, points_per_probe, the fraction "auto" uses.
ROWS = (("auto: max(64, N/16)", "auto", 16), ("max(64, N/8)", "auto", 8), ("every point", None, 16))


def spread(model, batch, exact: dict, points_per_probe, fraction: int, draws: int) -> tuple[dict, float]:
    """Per term (relative std, relative bias) of ``draws`` one-probe estimates, and ms per estimate."""
    saved, fd.AUTO_FRACTION = fd.AUTO_FRACTION, fraction
    try:
        generator = torch.Generator().manual_seed(1)
        values: dict[str, list[float]] = {name: [] for name in exact}
        start = time.perf_counter()
        for _ in range(draws):
            est = fd.finite_difference_traces(model, batch, generator=generator, points_per_probe=points_per_probe)
            for name in exact:
                values[name].append(float(est.traces[name]))
        ms = (time.perf_counter() - start) / draws * 1e3
    finally:
        fd.AUTO_FRACTION = saved
    stats = {}
    for name, v in values.items():
        t = torch.tensor(v, dtype=torch.float64) / float(exact[name])
        stats[name] = (t.std().item(), t.mean().item() - 1)
    return stats, ms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--draws", type=int, default=150)
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.draws} one-probe estimates per row")
    print(f"{'case':<9}{'points per probe':<22}{'ms':>7}  per term: relative std (relative bias)")
    for case in args.cases:
        torch.manual_seed(0)
        model, batch = CASES[case]()
        exact = ntk_traces(model, batch)
        for label, points_per_probe, fraction in ROWS:
            stats, ms = spread(model, batch, exact, points_per_probe, fraction, args.draws)
            terms = "  ".join(f"{name} {s:.2f} ({b:+.2f})" for name, (s, b) in stats.items())
            print(f"{case:<9}{label:<22}{ms:7.1f}  {terms}", flush=True)


if __name__ == "__main__":
    main()

"""The prepared GPU check runs where there is no GPU (its CPU mode), so it is not found broken on the
rare day a GPU is lent."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_in_its_cpu_mode_and_prints_one_table(tmp_path):
    out = tmp_path / "table.md"
    args = ["--device", "cpu", "--sizes", "8x32", "--trainer-size", "8x32", "--steps", "14", "--repeats", "2"]
    args += ["--two-output", "8x32"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", *args, "--no-tests", "--no-jax", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert "| 8 | 32 |" in table
    assert "Two-output 2-D PINN, 4x8 tanh, 32 pde + 8 ic points" in table
    assert "| capture_step=False |" in table and "| capture_step=True |" in table


def test_the_flow_case_of_the_cost_benchmark_is_exact_on_the_gram_path():
    # benchmarks/exact_cost.py's three-output, four-term flow system: what it times must be exact traces
    # on the Gram path (a fallback would time another path), with one backward per group and component.
    import torch
    from conftest import reference_traces

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from exact_cost import SteadyFlow2d, flow_batch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from test_jacobian_cost import plain_step_ops, warm_call

    torch.manual_seed(0)
    model = SteadyFlow2d(width=6, depth=2).double()
    batch = tuple(t.double() for t in flow_batch(n_interior=9, n_boundary=8))
    assert batch[1].shape == (8, 2) and (batch[0].min(0).values == torch.tensor([-0.5, -0.5])).all()
    est, ops, backwards = warm_call(model, batch)
    assert set(est.info["paths"].values()) == {"gram"}
    assert backwards == 4  # momentum_x with the boundary's u, its v, momentum_y, continuity
    assert ops.syncs == 0
    # measured 780 of a plain step's 698 on torch 2.13, 825 of 740 on 2.4 (1,354 of 1,224 at the benchmark's 4×128)
    assert ops.total <= 1.2 * plain_step_ops(copy.deepcopy(model), batch), ops.total
    want = reference_traces(model, batch)
    for name in want:
        torch.testing.assert_close(est.traces[name], want[name], rtol=1e-10, atol=0)


def test_the_fd_points_benchmark_compares_the_point_fractions_it_names():
    # benchmarks/fd_points.py backs the "auto" default of FiniteDifference: each row must run with the
    # fraction it names (and put the module's default back), and its statistics must be those of the draws.
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fd_points
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import lightning_ntk.estimators.finite_difference as fd

    class Linear(torch.nn.Module):  # r = w x: every probe on every point gives Tr K = Σ x², exactly
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.float64))
            self.sizes: list[int] = []

        def residuals(self, x):
            self.sizes.append(x.shape[0])
            return {"data": self.w * x}

    x = torch.linspace(0.5, 1.5, 2000, dtype=torch.float64).reshape(-1, 1)
    exact = {"data": x.square().sum()}
    eighth, every = Linear(), Linear()
    stats, _ = fd_points.spread(eighth, x, exact, "auto", 8, draws=3)
    stats_all, _ = fd_points.spread(every, x, exact, None, 16, draws=2)
    assert fd.AUTO_FRACTION == 16
    assert eighth.sizes[-6:] == [250] * 6 and every.sizes == [2000] * 4  # two evaluations per draw
    std, bias = stats_all["data"]
    assert abs(bias) < 1e-6 and std < 1e-6  # every point of a linear residual: exact up to rounding
    std, bias = stats["data"]
    assert std > 1e-3  # a subsample of 250 unequal points shows in the spread
    assert [fraction for _, _, fraction in fd_points.ROWS] == [16, 8, 16]


def test_the_derivatives_benchmark_times_two_paths_that_agree(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import derivatives_cost
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    derivatives_cost.main(["--width", "8", "--depth", "2", "--points", "4", "16", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    tables = [
        [line.split() for line in lines[k + 2 : k + 6]]
        for k, line in enumerate(lines)
        if line.startswith(("u_xx", "Lap"))
    ]
    assert len(tables) == 2
    for rows in tables:
        assert [(r[0], r[1]) for r in rows] == [("4", "frozen"), ("4", "with"), ("16", "frozen"), ("16", "with")]
        assert all(float(r[-1]) < 1e-5 for r in rows)  # both ways give the same derivatives


def test_the_cost_breakdown_times_each_phase_and_puts_the_functions_back(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import exact_cost
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    before = {name: getattr(owner, attr) for name, (owner, attr) in exact_cost.PHASES.items()}
    exact_cost.main(["--cases", "1d-64", "--breakdown", "--repeats", "2"])
    assert {name: getattr(owner, attr) for name, (owner, attr) in exact_cost.PHASES.items()} == before
    step, exact = capsys.readouterr().out.splitlines()[1:3]
    assert "forward" in step and "backward" in step and "optimizer" in step
    spent = dict(part.rsplit(" ", 1) for part in exact.split(": ", 1)[1].split(" (")[0].split(", "))
    assert set(spent) == {"evaluation", "walk", "backwards", "Gram products", "rest"}
    assert all(float(v) > 0 for k, v in spent.items() if k != "rest")  # each phase ran in the warm call


@pytest.mark.skipif(sys.platform == "win32", reason="page faults are read with `resource` (Unix)")
def test_the_cost_table_counts_the_page_faults_a_call_takes(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import exact_cost
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # 64 MiB written into fresh memory (above glibc's mmap threshold): every page is faulted in.
    assert exact_cost.faults_of(lambda: torch.ones(1 << 24)) > 4000
    assert exact_cost.faults_of(lambda: None) < 100
    exact_cost.main(["--cases", "1d-64", "--repeats", "1"])
    header, *rows = capsys.readouterr().out.splitlines()[1:]
    assert header.split()[-1] == "faults"
    assert [" ".join(r.split()[1:3]) for r in rows] == ["training step", "exact traces", "fd (1"]
    assert all(r.split()[-1].isdigit() for r in rows)


def test_the_gauss_newton_benchmarks_run_and_print_their_tables(tmp_path):
    import json

    cost = subprocess.run(
        [sys.executable, "benchmarks/gauss_newton_cost.py", "--cases", "8x2:120", "--repeats", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cost.returncode == 0, cost.stderr[-3000:]
    assert "step/floor" in cost.stdout and "its 1e-06" in cost.stdout
    row = cost.stdout.strip().splitlines()[-1].split()
    assert row[0] == "8x2" and int(row[1]) == 3 * 34 + 2 * 8  # m: 3 rows per interior point, 2 per boundary point
    for optimizer, errors in (("adam", [0.5, 0.1]), ("gauss_newton", [0.4, 1e-3])):
        curve = [{"seconds": 10.0 * k, "step": k, "error": e} for k, e in enumerate(errors, 1)]
        run = {"example": "demo", "optimizer": optimizer, "seed": 0, "curve": curve, "weights": {}}
        (tmp_path / f"{optimizer}.json").write_text(json.dumps(run))
    curves = subprocess.run(
        [sys.executable, "benchmarks/gauss_newton_curves.py", str(tmp_path), "--marks", "10", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert curves.returncode == 0, curves.stderr[-3000:]
    lines = {line.split()[1]: line.split() for line in curves.stdout.splitlines()[1:]}
    assert lines["gauss_newton"][3:5] == ["4.00e-01", "1.00e-03"] and lines["adam"][4] == "1.00e-01"


def test_the_damping_benchmark_runs_both_rules():
    for rule in ("nielsen", "marquardt"):
        done = subprocess.run(
            [sys.executable, "benchmarks/gauss_newton_damping.py", rule, "--seconds", "0.5"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.startswith(rule) and "rel. L2 of u" in done.stdout


def test_the_collocation_cost_benchmark_runs_and_prints_both_scores():
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/collocation_cost.py",
            "--pool-factor",
            "1",
            "--repeats",
            "1",
            "--steps-per-repeat",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split()[0] for line in done.stdout.strip().splitlines()[2:]]
    assert rows == ["rad", "ntk"], done.stdout

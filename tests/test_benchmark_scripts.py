"""The prepared GPU check runs where there is no GPU (its CPU mode), so it is not found broken on the
rare day a GPU is lent."""

import subprocess
import sys
from pathlib import Path

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

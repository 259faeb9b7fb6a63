"""The README's quick start and plain-PyTorch example run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def code_block(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow  # trains for ~30 s each; CI runs it
@pytest.mark.parametrize("heading", ["## Quick start", "### Without Lightning"])
def test_readme_example_runs_as_written(heading, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code_block(heading))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if heading == "## Quick start":
        error = float(re.search(r"relative L2 error: ([0-9.eE+-]+)", done.stdout).group(1))
        assert error < 0.05, done.stdout
        # The weight the README's comment promises is the one it prints.
        promised = float(re.search(r"\{'bc': ~([0-9.]+)", code_block(heading)).group(1))
        printed = float(re.search(r"\{'bc': ([0-9.eE+-]+)", done.stdout).group(1))
        assert printed == pytest.approx(promised, rel=0.3), (printed, promised)


@pytest.mark.slow  # trains for ~30 s; CI runs it
def test_readme_adaptive_collocation_continues_the_quick_start(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code_block("## Quick start") + code_block("### Adaptive collocation") + "print('done')\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.rstrip().endswith("done")


@pytest.mark.slow  # trains the quick start (~30 s) and 100 Gauss–Newton steps; CI runs it
def test_readme_gauss_newton_continues_the_quick_start(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code_block("## Quick start") + code_block("### Gauss–Newton"))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = [float(e) for e in re.findall(r"relative L2 error: ([0-9.eE+-]+)", done.stdout)]
    assert len(errors) == 2 and errors[1] < 5e-5 < errors[0], done.stdout

"""The pure-torch core imports without Lightning; the Lightning layer resolves lazily."""

import subprocess
import sys

import pytest

BLOCK = "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None; "


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_core_imports_with_lightning_blocked():
    core = "lightning_ntk.traces, lightning_ntk.estimators, lightning_ntk.weights, lightning_ntk.spectrum"
    done = run(
        f"import lightning_ntk, {core}, lightning_ntk.derivatives, lightning_ntk.jacobian, lightning_ntk.averaging, "
        "lightning_ntk.tags, lightning_ntk.estimators.grad_norm; "
        "print(sorted(m for m, v in sys.modules.items() if m.split('.')[0] == 'lightning' and v is not None))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_core_computes_traces_in_a_plain_torch_loop_with_lightning_blocked():
    done = run(
        "import torch; from lightning_ntk import ntk_traces, trace_weights\n"
        "class Fit(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.lin = torch.nn.Linear(1, 1)\n"
        "    def residuals(self, x):\n"
        "        return {'a': self.lin(x), 'b': 3 * self.lin(x)}\n"
        "t = ntk_traces(Fit(), torch.tensor([[1.0], [2.0]]))\n"
        "print(float(t['a']), float(t['b']), float(trace_weights(t)['a']))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["7.0", "63.0", "10.0"]


def test_lightning_layer_resolves_lazily_and_unknown_names_raise():
    import lightning_ntk

    assert lightning_ntk.PINNModule.__name__ == "PINNModule"
    assert lightning_ntk.NTKWeightingCallback.__name__ == "NTKWeightingCallback"
    assert lightning_ntk.NTKSpectrumMonitor.__name__ == "NTKSpectrumMonitor"
    assert set(lightning_ntk.__all__) <= set(dir(lightning_ntk))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lightning_ntk.nope  # noqa: B018
    blocked = run("import lightning_ntk; lightning_ntk.PINNModule")
    assert blocked.returncode != 0 and "lightning" in blocked.stderr

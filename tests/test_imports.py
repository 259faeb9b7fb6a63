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
        "lightning_ntk.tags, lightning_ntk.estimators.grad_norm, lightning_ntk.causal, lightning_ntk.ntk_view, "
        "lightning_ntk.collocation, lightning_ntk.collocation_points; "
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


def _package_import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports anywhere in its source (``TYPE_CHECKING`` blocks and
    function-level imports included); ``from lightning_ntk import tags`` counts as an edge to ``tags``."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "lightning_ntk"
    files = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in files else base)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        # The root package re-exports everything; an edge to it says nothing about the order of the modules.
        graph[name] = {e for e in edges if e in files and e not in (name, "lightning_ntk")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_package_has_no_import_cycles():
    graph = _package_import_graph()
    assert len(graph) > 40 and "lightning_ntk.jacobian.gram.layouts" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

"""The architecture page's claims, held to the code: each test reads a claim from ``docs/architecture.md`` (so a
reworded claim fails here until it is checked again) and checks it against the code's constants or behaviour.
``test_docs_held_to_code`` checks only that the names the page cites exist."""

import re
from pathlib import Path

import pytest
import torch
from conftest import HelperPoisson, poisson_batch

from lightning_ntk import ntk_traces
from lightning_ntk.jacobian import dispatch
from lightning_ntk.memory import forget, memory_of

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "architecture.md").read_text()
TEXT = " ".join(PAGE.split())  # claims may wrap across lines


def claim(pattern: str) -> re.Match:
    found = re.search(pattern, TEXT)
    assert found, f"docs/architecture.md no longer says {pattern!r}: check the new wording against the code"
    return found


def test_slices_are_cut_at_the_size_the_page_gives():
    stated = int(
        claim(r"`_gram_in_slices` cuts groups of more than ([\d,]+) points into slices").group(1).replace(",", "")
    )
    assert stated == dispatch._GRAM_MAX_POINTS


def test_the_per_point_paths_are_tried_in_the_order_the_page_gives():
    files = claim(r"\(`(\w+)\.py`, `(\w+)\.py`, `(\w+)\.py`\), one loop over `_POINT_PATHS`")
    assert list(files.groups()) == list(dispatch._POINT_PATHS)


def _counting_cross_checks(monkeypatch) -> list[dict[int, int]]:
    """Each cross-check's probe: how many points it takes from a term of each size."""
    probes = []
    original = dispatch._per_point_norms

    def spy(request, paths, probe, only=None):
        probes.append({n: int(points.numel()) for n, points in probe.items()})
        return original(request, paths, probe, only=only)

    monkeypatch.setattr(dispatch, "_per_point_norms", spy)
    return probes


def test_the_cross_check_runs_once_per_batch_signature_on_up_to_three_points_per_term(monkeypatch):
    claim(
        r"The first time per module and batch signature, `_cross_check` compares the Gram norms with a per-point "
        r"path on up to three points per term \(its first, middle and last\)"
    )
    forget()
    probes = _counting_cross_checks(monkeypatch)
    model = HelperPoisson().double()
    ntk_traces(model, poisson_batch(n_r=12))  # a 2-point and a 12-point term
    ntk_traces(model, poisson_batch(n_r=12, seed=1))  # same signature: no second check
    assert probes == [{2: 2, 12: 3}]
    ntk_traces(model, poisson_batch(n_r=20))  # a new signature is checked again
    assert probes == [{2: 2, 12: 3}, {2: 2, 20: 3}]


def test_what_the_exact_paths_learn_is_in_module_memory_and_forget_clears_it():
    claim(
        r"What the exact paths learn about a module is in its `memory\.ModuleMemory` \(`memory_of\(module\)`, weakly "
        r"keyed by the module, cleared by `forget\(\)`\)"
    )
    forget()
    model = HelperPoisson().double()
    ntk_traces(model, poisson_batch())
    assert memory_of(model).exact, "the exact path kept nothing in the module's memory"
    forget()
    assert not memory_of(model).exact


@pytest.mark.parametrize(
    "pattern, budget",
    [
        (r"dispatches at most ([\d.]+) of one plain step's aten ops", "test_jacobian_cost.py"),
        (r"runs two backwards and at most ([\d.]+) plain steps of ops", "test_jacobian_cost.py"),
        (r"the three-output flow case of the benchmark at most ([\d.]+)", "test_benchmark_scripts.py"),
    ],
)
def test_the_op_budgets_the_page_gives_are_the_tests(pattern, budget):
    stated = float(claim(pattern).group(1))
    source = (ROOT / "tests" / budget).read_text()
    held = {float(v) for v in re.findall(r"ops\.total <= ([\d.]+) \*", source)}
    assert stated in held, f"the page gives {stated}, {budget} holds {sorted(held)}"


def test_the_checker_sees_a_claim_that_is_gone():
    with pytest.raises(AssertionError, match="no longer says"):
        claim(r"cuts groups of more than 99 points")


def test_a_page_number_that_differs_from_the_code_fails(monkeypatch):
    monkeypatch.setattr(dispatch, "_GRAM_MAX_POINTS", 8192)
    with pytest.raises(AssertionError):
        test_slices_are_cut_at_the_size_the_page_gives()
    torch.manual_seed(0)

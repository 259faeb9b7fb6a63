"""The dispatcher never crashes on a residual it can evaluate: a batch the package cuts (the
cross-check's three points, the per-point paths' single points, the Gram path's slices, fd's point
subsample) may break a residual that the whole batch does not, and then the computation evaluates the
batch it was given. Every number is compared with a hand-built Jacobian (float64, rtol 1e-10).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import reference_point_norms
from torch import nn

from lightning_ntk import PINNModule, ntk_traces
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.estimators.finite_difference import finite_difference_traces
from lightning_ntk.jacobian import per_point_squared_norms
from lightning_ntk.memory import memory_of
from lightning_ntk.points import batch_signature


class Sliced(PINNModule):
    """Boundary terms as fixed slices of one point tensor, the PDE term on every point of it."""

    def __init__(self) -> None:
        super().__init__(terms=["ic", "bc", "pde"])
        self.net = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))

    def residuals(self, x):
        xr = x.clone().requires_grad_(True)
        u = self.net(xr)
        u_x = torch.autograd.grad(u.sum(), xr, create_graph=True)[0]
        u_xx = torch.autograd.grad(u_x.sum(), xr, create_graph=True)[0]
        # An index past the end of a cut batch raises (IndexError), a slice comes out empty (ValueError).
        return {"ic": self.net(x[torch.arange(4)]) - 1.0, "bc": self.net(x[4:8]), "pde": u_xx + torch.sin(u)}


def sliced(n: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    model = Sliced().double()
    return model, torch.rand(n, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_exact(got, model, batch):
    want = reference_point_norms(model, batch)
    assert set(got.norms) == set(want)
    for name in want:
        torch.testing.assert_close(got.norms[name], want[name], rtol=1e-10, atol=0)


def test_a_module_that_slices_its_point_tensor_gets_exact_traces_on_the_default_path():
    model, x = sliced()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every term stays on the Gram path: nothing to warn about
        got = per_point_squared_norms(model, x)
    assert got.paths == {"ic": "gram", "bc": "gram", "pde": "gram"}
    assert_exact(got, model, x)
    entry = memory_of(model).exact[batch_signature(x)]
    assert entry.checked and entry.off_gram == {}  # the cross-check ran (on the rows path) and agreed
    assert_exact(per_point_squared_norms(model, x), model, x)  # warm


def test_the_per_point_paths_step_aside_for_rows_when_single_points_break_the_residual():
    model, x = sliced()
    got = per_point_squared_norms(model, x, paths=("vmap", "loop", "rows"))
    assert got.paths["pde"] == "rows"
    assert_exact(got, model, x)


def test_a_large_group_whose_slices_break_the_residual_is_taken_whole(monkeypatch):
    from lightning_ntk.jacobian import dispatch

    monkeypatch.setattr(dispatch, "_GRAM_MAX_POINTS", 6)
    model, x = sliced(n=15, seed=1)
    got = per_point_squared_norms(model, x)
    assert set(got.paths.values()) == {"gram"}
    assert_exact(got, model, x)


def test_fd_on_a_sliced_module_evaluates_every_point_with_one_warning():
    model, x = sliced(n=400, seed=2)
    exact = exact_traces(model, x)
    with pytest.warns(UserWarning, match="evaluates every point"):
        est = finite_difference_traces(model, x, num_probes=1, generator=torch.Generator().manual_seed(0))
    assert all(bool(torch.isfinite(v)) for v in est.traces.values())
    assert est.num_rows == exact.num_rows == {"ic": 4, "bc": 4, "pde": 400}
    # A subsample smaller than the slices (the cut breaks the residual) is refused with the reason.
    with pytest.raises(ValueError, match="points_per_probe=None"):
        finite_difference_traces(model, x[:100], points_per_probe=3, generator=torch.Generator().manual_seed(0))


def test_fd_of_a_sliced_module_is_unbiased_for_the_exact_traces():
    model, x = sliced(n=100, seed=3)
    exact = exact_traces(model, x).traces
    generator = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = finite_difference_traces(model, x, num_probes=400, generator=generator, points_per_probe=None)
    for name, value in exact.items():
        assert abs(float(est.traces[name] - value)) < 4 * float(est.stderr[name]), name


class BuiltWeight(nn.Module):
    """Two terms on their own points, both through a weight built from two parameters (``A.mv(v)``)."""

    terms = ("a", "b")

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))

    def residuals(self, batch):
        xa, xb = batch
        w = self.A.mv(self.v)
        xb = xb.clone().requires_grad_(True)
        du = torch.autograd.grad(torch.tanh(xb @ w).sum(), xb, create_graph=True)[0]
        return {"a": torch.tanh(xa @ w), "b": du[:, 0]}


def test_the_fallback_warning_gives_its_reason_once():
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64))
    with pytest.warns(UserWarning) as seen:
        traces = ntk_traces(BuiltWeight(), batch)
    (message,) = [str(w.message) for w in seen if "Exact NTK traces of BuiltWeight" in str(w.message)]
    assert message.count("does not apply") == 1 and message.count("aten.mv") == 1, message
    assert "['a', 'b']" in message
    model = BuiltWeight()
    for name, x in zip(("a", "b"), batch, strict=True):  # each point's squared norm by hand
        want = sum(
            sum(
                gr.square().sum()
                for gr in torch.autograd.grad(model.residuals(_one(batch, name, n))[name][0], [model.A, model.v])
            )
            for n in range(x.shape[0])
        )
        torch.testing.assert_close(traces[name], want, rtol=1e-10, atol=0)


def _one(batch, name, n):
    xa, xb = batch
    return (xa[n : n + 1], xb) if name == "a" else (xa, xb[n : n + 1])

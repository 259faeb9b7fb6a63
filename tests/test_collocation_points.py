"""The pure-torch helpers behind AdaptiveCollocation's batch handling, on a plain module (no Lightning)."""

import pytest
import torch
from torch import nn

from lightning_ntk import collocation_points as cp


class Fit(nn.Module):
    terms = ("bc", "pde")

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1, dtype=torch.float64)

    def residuals(self, batch):
        x = batch["pde"].requires_grad_()
        u = self.lin(x).tanh()
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        return {"bc": self.lin(batch["bc"]), "pde": du[:, 0] - u[:, 0]}


def batch(n: int = 6):
    g = torch.Generator().manual_seed(0)
    return {
        "bc": torch.rand(n, 2, generator=g, dtype=torch.float64),
        "pde": torch.rand(n, 2, generator=g, dtype=torch.float64),
    }


def test_the_tensor_each_term_reads_passes_and_the_other_terms_does_not():
    model, b = Fit(), batch()
    cp.check_points_are_read(model, b, "pde", b["pde"])
    cp.check_points_are_read(model, b, "bc", b["bc"])
    with pytest.raises(ValueError, match=r"term 'pde''s residual stays finite .* Pass `points=\{'pde'"):
        cp.check_points_are_read(model, b, "pde", b["bc"])
    assert all(p.requires_grad for p in model.parameters()), "the probe left the parameters frozen"
    assert torch.isfinite(b["pde"]).all() and torch.isfinite(b["bc"]).all(), "the probe wrote into the batch"


def test_with_points_replaces_one_leaf_and_shares_the_others():
    b = batch()
    new = torch.zeros(3, 2, dtype=torch.float64)
    swapped = cp.with_points(b, b["pde"], new)
    assert swapped["pde"] is new and swapped["bc"] is b["bc"] and b["pde"] is not new
    with pytest.raises(ValueError, match="one tensor of the batch itself"):
        cp.with_points(b, b["pde"][:, :], new)


def test_term_points_defaults_to_the_terms_key_and_names_the_fix_for_other_batches():
    b = batch()
    assert cp.term_points(b, "pde", None) is b["pde"]
    assert cp.term_points([b["bc"], b["pde"]], "pde", lambda t: t[1]) is b["pde"]
    with pytest.raises(ValueError, match=r"batch is a list, not a mapping"):
        cp.term_points([b["bc"], b["pde"]], "pde", None)


def test_check_pool_names_what_the_sampler_must_return():
    target = batch()["pde"]
    assert cp.check_pool("pde", torch.rand(12, 2, dtype=torch.float64), target, 12).shape == (12, 2)
    with pytest.raises(ValueError, match=r"must return \(12, 2\) torch.float64 points; it returned torch.float32"):
        cp.check_pool("pde", torch.rand(12, 2), target, 12)
    with pytest.raises(TypeError, match="it returned list"):
        cp.check_pool("pde", [[0.0, 0.0]], target, 12)


def test_domain_excess_speaks_only_for_a_pool_well_beyond_the_batch():
    target = torch.rand(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    inside = torch.rand(256, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert cp.domain_excess("pde", inside, target) is None
    message = cp.domain_excess("pde", inside * 2 - 0.5, target)
    assert message is not None and "term 'pde'" in message and "coordinate(s) [0, 1]" in message


def test_parameters_frozen_restores_requires_grad_even_on_error():
    model = Fit()
    with pytest.raises(RuntimeError), cp.parameters_frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError
    assert all(p.requires_grad for p in model.parameters())

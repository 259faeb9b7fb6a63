import pytest
import torch
from conftest import HelperPoisson, poisson_batch

from lightning_ntk import PINNModule


class Broken(HelperPoisson):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def residuals(self, batch):
        return self.out(self, batch)


@pytest.mark.parametrize(
    "terms, match",
    [
        ([], "empty"),
        (["a", "a"], "more than once"),
        ("ab", "sequence"),
        (["a", ""], "non-empty"),
        (["a/b"], "'/'"),
        ([1], "non-empty string"),
    ],
)
def test_bad_terms(terms, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PINNModule(terms=terms)


def test_weights_buffer_defaults_init_and_setter():
    m = HelperPoisson()
    assert m.term_weights == {"bc": 1.0, "pde": 1.0}
    assert "ntk_weights" in m.state_dict()
    m2 = PINNModule(terms=["bc", "pde"], init_weights={"bc": 10.0})
    assert m2.term_weights == {"bc": 10.0, "pde": 1.0}
    buffer = m.ntk_weights
    m.set_term_weights({"pde": 2.5})
    assert m.term_weights == {"bc": 1.0, "pde": 2.5}
    assert m.ntk_weights is buffer  # updated in place, so compiled graphs keep seeing it


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"ic": 1.0}, r"Unknown term\(s\) \['ic'\]"),
        ({"bc": 0.0}, "> 0"),
        ({"bc": float("nan")}, "> 0"),
        ({"bc": -1.0}, "> 0"),
        ({"bc": "1"}, "> 0"),
        (torch.ones(3), r"expected \(2,\)"),
    ],
)
def test_set_term_weights_validates(weights, match):
    with pytest.raises(ValueError, match=match):
        HelperPoisson().set_term_weights(weights)


def _contract_cases():
    return [
        (
            lambda self, b: {"bc": self.net(b[0]), "pde": self.net(b[1]), "ic": self.net(b[0])},
            ValueError,
            r"returned term\(s\) \['ic'\] that were not declared",
        ),
        (lambda self, b: {"bc": self.net(b[0])}, ValueError, r"did not return declared term\(s\) \['pde'\]"),
        (
            lambda self, b: {"bc": self.net(b[0]), "pde": [1.0]},
            TypeError,
            "term 'pde' must be a torch.Tensor",
        ),
        (
            lambda self, b: {"bc": self.net(b[0]), "pde": b[1] * 2},
            ValueError,
            "'pde' does not depend on any trainable",
        ),
        (
            lambda self, b: {"bc": self.net(b[0]), "pde": torch.ones(3, dtype=torch.long)},
            TypeError,
            "'pde' has dtype",
        ),
        (lambda self, b: {"bc": self.net(b[0]), "pde": self.net(b[1])[:0]}, ValueError, "'pde' is empty"),
        (
            lambda self, b: {"bc": self.net(b[0]), "pde": self.net(b[1]).sum()},
            ValueError,
            "'pde' is a scalar",
        ),
        (lambda self, b: [self.net(b[0])], TypeError, "must return a mapping"),
    ]


@pytest.mark.parametrize("out, kind, match", _contract_cases())
def test_contract_errors_name_the_term(out, kind, match):
    model = Broken(out)
    with pytest.raises(kind, match=match):
        model.training_step(poisson_batch(dtype=torch.float32), 0)


def test_training_step_is_weighted_sum_and_term_loss_is_overridable():
    class L1(HelperPoisson):
        def term_loss(self, term, residual):
            return residual.abs().mean() if term == "bc" else super().term_loss(term, residual)

    model = L1().double()
    model.set_term_weights({"bc": 3.0, "pde": 0.5})
    batch = poisson_batch()
    r = model.residuals(batch)
    expected = 3.0 * r["bc"].abs().mean() + 0.5 * r["pde"].square().mean()
    step = model.step_losses(batch)
    total, losses = step.total, step.losses
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(losses["pde"], r["pde"].square().mean())
    # The weights are constants for autograd: weights given as a tensor with a graph are not linked.
    w = torch.tensor([3.0, 0.5], dtype=torch.float64, requires_grad=True)
    model.set_term_weights(w)
    total = model.step_losses(batch).total
    assert torch.autograd.grad(total, w, allow_unused=True)[0] is None


def test_checkpoint_with_other_terms_fails_clearly():
    model = HelperPoisson()
    ckpt = {}
    model.on_save_checkpoint(ckpt)
    other = PINNModule(terms=["boundary", "pde"])
    with pytest.raises(ValueError, match=r"written for terms \['bc', 'pde'\].*declares \['boundary', 'pde'\]"):
        other.on_load_checkpoint(ckpt)


def test_weighted_loss_is_a_deprecated_name_of_step_losses():
    model = HelperPoisson().double()
    model.set_term_weights({"bc": 3.0, "pde": 0.5})
    batch = poisson_batch()
    with pytest.deprecated_call(match=r"step_losses\(batch\)"):
        total, losses = model.weighted_loss(batch)
    step = model.step_losses(batch)
    torch.testing.assert_close(total, step.total, rtol=0, atol=0)
    assert list(losses) == list(step.losses)
    for name in losses:
        torch.testing.assert_close(losses[name], step.losses[name], rtol=0, atol=0)

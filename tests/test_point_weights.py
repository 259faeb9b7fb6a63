"""PointWeights: one buffer per term written in place, a new one only when the shape changes, and the rule
for when the loss applies them."""

import pytest
import torch

from lightning_ntk.point_weights import PointWeights


def test_a_term_keeps_its_buffer_while_its_point_count_stays():
    weights = PointWeights(["bc", "pde"])
    weights.write({"pde": torch.tensor([1.0, 2.0])})
    first = weights.buffers["pde"]
    source = torch.tensor([5.0, 6.0])
    weights.write({"pde": source})
    assert weights.buffers["pde"] is first and first.tolist() == [5.0, 6.0]
    source.fill_(0.0)  # a copy: the caller's tensor is not kept
    assert first.tolist() == [5.0, 6.0]
    weights.write({"pde": torch.tensor([1.0, 2.0, 3.0])})  # another point count: another buffer
    assert weights.buffers["pde"] is not first and weights.buffers["pde"].shape == (3,)


def test_the_loss_applies_them_in_training_mode_and_only_if_asked():
    weights = PointWeights(["pde"])
    weights.write({"pde": torch.ones(2)}, in_loss=False)
    assert weights.for_loss(training=True) == {}
    weights.write({"pde": torch.ones(2)}, in_loss=True)
    assert set(weights.for_loss(training=True)) == {"pde"} and weights.for_loss(training=False) == {}
    weights.clear()
    assert weights.buffers == {}


@pytest.mark.parametrize(
    ("given", "match"),
    [({"res": torch.ones(2)}, r"unknown term\(s\) \['res'\]"), ({"pde": torch.ones(2, 1)}, "must be a 1-D tensor")],
)
def test_bad_weights_are_refused_before_any_is_written(given, match):
    weights = PointWeights(["pde"])
    with pytest.raises(ValueError, match=match):
        weights.write({"pde": torch.ones(2), **given} if "res" in given else given)
    assert weights.buffers == {}

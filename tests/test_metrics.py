import pytest
import torch

from lightning_ntk.metrics import RelativeL2Error


def test_matches_direct_computation_with_an_uneven_split():
    g = torch.Generator().manual_seed(0)
    preds, target = torch.randn(103, 2, generator=g), torch.randn(103, 2, generator=g)
    metric = RelativeL2Error()
    for chunk in (slice(0, 1), slice(1, 40), slice(40, 103)):  # batches of 1, 39 and 63 rows
        metric.update(preds[chunk], target[chunk])
    direct = (preds - target).norm() / target.norm()
    torch.testing.assert_close(metric.compute(), direct, rtol=1e-6, atol=0)
    # Not the mean of per-batch ratios, which would differ here.
    ratios = [
        float((preds[c] - target[c]).norm() / target[c].norm()) for c in (slice(0, 1), slice(1, 40), slice(40, 103))
    ]
    assert abs(sum(ratios) / 3 - float(direct)) > 1e-3


def test_properties_reset_and_errors():
    metric = RelativeL2Error()
    assert metric.higher_is_better is False
    metric.update(torch.ones(3), torch.ones(3))
    assert float(metric.compute()) == 0.0
    metric.reset()
    with pytest.raises(ValueError, match="target seen so far is zero"):
        metric.update(torch.ones(2), torch.zeros(2))
        metric.compute()
    with pytest.raises(ValueError, match="shape"):
        RelativeL2Error().update(torch.ones(2), torch.ones(3))


def test_states_reduce_by_sum():
    # Two "ranks" synced through torchmetrics' own sync (a gather that returns both ranks' states, as
    # all_gather would): the result equals one metric on all data. Metric.sync is public since
    # torchmetrics 1.0, so this runs on the declared floor too (merge_state came in 1.6).
    a, b, both = RelativeL2Error(sync_on_compute=False), RelativeL2Error(), RelativeL2Error()
    x, y = torch.arange(5.0), torch.arange(5.0) + 1
    a.update(x[:2], y[:2])
    b.update(x[2:], y[2:])
    both.update(x, y)
    other = {id(state): b.metric_state[name] for name, state in a.metric_state.items()}
    a.sync(dist_sync_fn=lambda state, group=None: [state, other[id(state)]], distributed_available=lambda: True)
    torch.testing.assert_close(a.compute(), both.compute())

import pytest
import torch

from lightning_ntk.averaging import TraceAverager


def test_mean_follows_the_recursion_and_state_round_trips():
    avg = TraceAverager(beta=0.75)
    values = [torch.tensor([4.0, 1.0]), torch.tensor([8.0, 3.0]), torch.tensor([2.0, 2.0])]
    mean, stderr = avg.update(values[0], torch.tensor([1.0, float("nan")]))
    assert torch.equal(mean, values[0])
    torch.testing.assert_close(stderr, torch.tensor([1.0, 0.0]) * (0.25 / 1.75) ** 0.5)
    want = values[0]
    for v in values[1:]:
        mean, _ = avg.update(v)
        want = 0.75 * want + 0.25 * v
    torch.testing.assert_close(mean, want)
    other = TraceAverager(beta=0.75)
    other.load_state_dict(avg.state_dict())
    torch.testing.assert_close(other.update(values[0])[0], avg.update(values[0])[0], rtol=0, atol=0)


def test_standard_error_of_the_average_matches_its_spread_for_iid_estimates():
    # 4,000 independent runs of 200 i.i.d. N(5, 1) estimates each: the spread of the final averages
    # is sqrt((1 − β)/(1 + β)), and the reported standard error estimates the same (a small β shows
    # any bias of the running variance: without the (1+β)/2 factor it is 2β/(1+β) = 2/3 of σ² here).
    beta, runs, steps = 0.5, 4000, 200
    g = torch.Generator().manual_seed(0)
    samples = 5.0 + torch.randn(steps, runs, generator=g, dtype=torch.float64)
    avg = TraceAverager(beta)
    for row in samples:
        mean, stderr = avg.update(row)
    expected = ((1 - beta) / (1 + beta)) ** 0.5
    assert float(mean.std()) == pytest.approx(expected, rel=0.05)
    assert float(stderr.square().mean()) == pytest.approx(expected**2, rel=0.05)
    assert float(mean.mean()) == pytest.approx(5.0, abs=4 * expected / runs**0.5)


def test_beta_is_checked():
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="beta"):
            TraceAverager(bad)

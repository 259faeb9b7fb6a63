import pytest
import torch

from lightning_ntk.averaging import TraceAverager


def test_mean_follows_the_recursion_and_state_round_trips():
    avg = TraceAverager(beta=0.75)
    values = [torch.tensor([4.0, 1.0]), torch.tensor([8.0, 3.0]), torch.tensor([2.0, 2.0])]
    mean, stderr = avg.update(values[0], torch.tensor([1.0, float("nan")]))
    assert torch.equal(mean, values[0])
    # The first value's own error: known (1.0) where given, unknown (NaN, not 0) where not.
    torch.testing.assert_close(stderr, torch.tensor([1.0, float("nan")]), equal_nan=True)
    want = values[0]
    for v in values[1:]:
        mean, _ = avg.update(v)
        want = 0.75 * want + 0.25 * v
    torch.testing.assert_close(mean, want)
    other = TraceAverager(beta=0.75)
    other.load_state_dict(avg.state_dict())
    a, b = other.update(values[0]), avg.update(values[0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stderr_by_hand_for_two_updates():
    # Start of known variance v0 = 4, β = 0.5: Var(m_1) = β² v0 + (1−β)² σ², with σ² estimated by
    # (δ² − v0) / 1 from δ = e_1 − m_0 (debiased by 1 − β = 0.5 after the EMA weight 0.5).
    avg = TraceAverager(beta=0.5)
    avg.update(torch.tensor([10.0]), torch.tensor([4.0]))
    mean, stderr = avg.update(torch.tensor([16.0]))
    assert float(mean) == 13.0
    sigma2 = 36.0 - 4.0
    assert float(stderr) == pytest.approx((0.25 * 4.0 + 0.25 * sigma2) ** 0.5)


@pytest.mark.parametrize("start_variance", [None, 0.0], ids=["unknown start", "exact start"])
def test_standard_error_of_the_average_matches_its_spread_at_every_step(start_variance):
    # 4,000 independent runs of i.i.d. N(5, 1) estimates (the first exact, variance 0, or one more
    # estimate of unknown variance): at every step the reported variance of the average matches the
    # spread of the averages over runs, and the estimate of σ² is unbiased (a small β shows any bias:
    # without the (1+β)/2-type corrections σ² came out 2β/(1+β) = 2/3 of the truth here).
    beta, runs, steps = 0.5, 4000, 40
    g = torch.Generator().manual_seed(0)
    samples = 5.0 + torch.randn(steps, runs, generator=g, dtype=torch.float64)
    avg = TraceAverager(beta)
    if start_variance is None:
        mean, stderr = avg.update(samples[0])
        assert bool(stderr.isnan().all())  # one estimate says nothing about its own error
    else:
        samples[0] = 5.0
        mean, stderr = avg.update(samples[0], torch.zeros(runs, dtype=torch.float64))
        assert bool((stderr == 0).all())
    for k, row in enumerate(samples[1:], start=1):
        mean, stderr = avg.update(row)
        if k in (1, 2, 5, 39):
            assert float(avg.sigma2().mean()) == pytest.approx(1.0, rel=0.06), k
            assert float(stderr.square().mean()) == pytest.approx(float(mean.var()), rel=0.08), k
    assert float(mean.mean()) == pytest.approx(5.0, abs=4 * float(mean.std()) / runs**0.5)


def test_checkpoints_of_the_earlier_format_still_load():
    avg = TraceAverager(beta=0.5)
    avg.load_state_dict({"beta": 0.5, "mean": torch.tensor([2.0]), "var": torch.tensor([3.0])})
    mean, stderr = avg.update(torch.tensor([2.0]))
    assert float(mean) == 2.0 and float(stderr) == pytest.approx((0.5 * 3.0 * (1 / 3)) ** 0.5, rel=1e-6)


def test_options_are_checked():
    for bad in (1.0, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="beta"):
            TraceAverager(bad)
    with pytest.raises(ValueError, match="start"):
        TraceAverager(0.9, start="zero")


def test_snapshot_restores_the_averages_after_later_updates():
    averager = TraceAverager(0.9)
    averager.update(torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.2]))
    averager.update(torch.tensor([1.5, 2.5]))
    mean, stderr = averager.mean.clone(), averager.stderr().clone()
    restore = averager.snapshot()
    averager.update(torch.tensor([9.0, 9.0]))
    assert not torch.equal(averager.mean, mean)
    restore()
    assert torch.equal(averager.mean, mean) and torch.equal(averager.stderr(), stderr)
    assert averager.num_deviations == 1

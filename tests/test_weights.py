import pytest
import torch

from lightning_ntk.weights import (
    WeightRule,
    balancing_weights,
    check_values,
    clamp_weights,
    ema_update,
    trace_weights,
)


def test_trace_mode_upweights_the_smaller_trace():
    # Guards against mistake 2 of other implementations: up-weighting the term with the larger trace.
    w = trace_weights({"bc": torch.tensor(2.0), "pde": torch.tensor(198.0)})
    torch.testing.assert_close(w["bc"], torch.tensor(100.0))
    torch.testing.assert_close(w["pde"], torch.tensor(200.0 / 198.0))
    assert w["bc"] > w["pde"] >= 1.0


def test_trace_mode_formula_three_terms():
    traces = torch.tensor([1.0, 3.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(balancing_weights(traces), torch.tensor([10.0, 10 / 3, 10 / 6], dtype=torch.float64))


def test_mean_trace_mode_uses_mean_diagonals():
    traces = torch.tensor([4.0, 600.0], dtype=torch.float64)
    rows = torch.tensor([2.0, 100.0], dtype=torch.float64)
    # mean diagonals 2 and 6, their mean 4: λ = (2, 2/3)
    torch.testing.assert_close(
        balancing_weights(traces, "mean_trace", rows), torch.tensor([2.0, 4 / 6], dtype=torch.float64)
    )


def test_mean_trace_equals_trace_over_T_when_counts_are_equal():
    traces = torch.tensor([1.0, 5.0, 9.0], dtype=torch.float64)
    rows = torch.full((3,), 50.0, dtype=torch.float64)
    torch.testing.assert_close(balancing_weights(traces, "mean_trace", rows), balancing_weights(traces) / 3)


def test_mean_trace_needs_counts_and_modes_are_checked():
    with pytest.raises(ValueError, match="num_rows"):
        balancing_weights(torch.ones(2), "mean_trace")
    with pytest.raises(ValueError, match="Unknown weighting mode 'max'"):
        balancing_weights(torch.ones(2), "max")


def test_ema():
    old, new = torch.tensor([10.0, 1.0]), torch.tensor([20.0, 3.0])
    torch.testing.assert_close(ema_update(old, new, 0.0), new)
    torch.testing.assert_close(ema_update(old, new, 0.9), torch.tensor([11.0, 1.2]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema_update(old, new, 1.0)


def test_clamps():
    w = torch.tensor([0.5, 5.0, 500.0])
    torch.testing.assert_close(clamp_weights(w, 1.0, 100.0), torch.tensor([1.0, 5.0, 100.0]))
    torch.testing.assert_close(clamp_weights(w, None, 10.0), torch.tensor([0.5, 5.0, 10.0]))
    assert clamp_weights(w) is w
    with pytest.raises(ValueError, match="larger than"):
        clamp_weights(w, 10.0, 1.0)


@pytest.mark.parametrize(
    "bad, kind, match",
    [
        (float("nan"), FloatingPointError, "not finite"),
        (float("inf"), FloatingPointError, "not finite"),
        (0.0, ValueError, "does not depend"),
    ],
)
def test_bad_traces_name_the_term(bad, kind, match):
    with pytest.raises(kind, match=f"term 'pde'.*{match}|{match}"):
        check_values(torch.tensor([1.0, bad]), ["bc", "pde"])
    with pytest.raises(kind, match="'pde'"):
        trace_weights({"bc": 1.0, "pde": bad})


def test_only_the_bad_terms_are_named():
    with pytest.raises(FloatingPointError) as err:
        check_values(torch.tensor([1.0, float("nan"), 2.0, float("inf")]), ["ic", "bc", "pde", "data"])
    assert "'bc' (nan), 'data' (inf) are not finite" in str(err.value)
    assert "'ic'" not in str(err.value) and "'pde'" not in str(err.value)


def test_weight_rule_is_the_rule_then_smoothing_then_clamps():
    traces = torch.tensor([2.0, 30.0, 500.0], dtype=torch.float64)
    rows = torch.tensor([4.0, 10.0, 100.0], dtype=torch.float64)
    previous = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    rule = WeightRule(mode="mean_trace", ema=0.25, min_weight=0.6, max_weight=4.0)
    mean_diag = traces / rows
    lam = mean_diag.mean() / mean_diag
    want = (0.25 * previous + 0.75 * lam).clamp(0.6, 4.0)
    torch.testing.assert_close(rule(traces, rows, previous), want, rtol=1e-12, atol=0)
    assert want.max() == 4.0 and want.min() == 0.6  # both clamps are exercised
    # Without previous weights there is nothing to smooth towards.
    torch.testing.assert_close(WeightRule(ema=0.5)(traces), traces.sum() / traces, rtol=1e-12, atol=0)
    assert "mean_trace" in repr(rule)


def test_the_deprecated_names_are_gone():
    import lightning_ntk
    import lightning_ntk.weights as weights

    for name in ("ntk_weights", "check_traces"):
        assert not hasattr(weights, name) and name not in lightning_ntk.__all__

"""CapturedCall's bookkeeping, run eagerly on the CPU: static buffers, copy-in, one entry per
signature, invalidation when the parameter set changes, results equal to eager bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import AutogradPoisson, poisson_batch
from torch import nn

from lightning_ntk.capture import CapturedCall
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.measured import CapturedEstimator


def stacked_traces(model):
    def fn(x_b, x_r):
        est = exact_traces(model, (x_b, x_r))
        return torch.stack([est.values[name] for name in model.terms])

    return fn


def test_results_equal_eager_bit_for_bit_after_parameter_updates_and_new_batches():
    torch.manual_seed(0)
    model = AutogradPoisson(width=8)
    call = CapturedCall(stacked_traces(model), state=lambda: list(model.parameters()))
    eager = stacked_traces(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(4):
        batch = poisson_batch(n_r=12, seed=seed, dtype=torch.float32)
        torch.testing.assert_close(call(*batch), eager(*batch), rtol=0, atol=0)
        opt.zero_grad()
        model.step_losses(batch).total.backward()
        opt.step()  # in place: the same signature
    assert len(call.entries) == 1
    assert next(iter(call.entries.values())).calls == 4


def test_the_function_reads_static_buffers_that_each_call_refills():
    seen = []

    def fn(x):
        seen.append(x)
        return x * 2

    call = CapturedCall(fn)
    a, b = torch.arange(3.0), torch.arange(3.0) + 10
    torch.testing.assert_close(call(a), a * 2)
    torch.testing.assert_close(call(b), b * 2)
    assert seen[0] is seen[1] and seen[0] is not a and seen[1] is not b  # one static buffer, refilled
    torch.testing.assert_close(seen[1], b, rtol=0, atol=0)


def test_a_new_shape_or_a_new_parameter_set_is_a_new_signature():
    net = nn.Linear(2, 1)
    call = CapturedCall(lambda x: net(x).sum(), state=lambda: list(net.parameters()))
    call(torch.ones(3, 2))
    call(torch.ones(3, 2))
    assert len(call.entries) == 1
    call(torch.ones(5, 2))
    assert len(call.entries) == 2
    net.weight = nn.Parameter(torch.zeros(1, 2))  # a new tensor, not an in-place change
    out = call(torch.ones(3, 2))
    assert len(call.entries) == 3
    torch.testing.assert_close(out, net(torch.ones(3, 2)).sum())
    call.clear()
    assert not call.entries


def test_tuples_and_disabled_capture():
    call = CapturedCall(lambda x, y: (x + y, x * y), enabled=False)
    s, p = call(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(s, torch.tensor([4.0, 6.0]))
    torch.testing.assert_close(p, torch.tensor([3.0, 8.0]))


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="warmup"):
        CapturedCall(lambda x: x, warmup=0)
    with pytest.raises(TypeError, match="tensors only"):
        CapturedCall(lambda x: x)([1.0])


@pytest.mark.parametrize("estimator", ["exact", "fd"])
def test_the_callback_through_captured_calls_trains_bit_for_bit_like_eager(tmp_path, estimator):
    """Different batches every step, weights recomputed every step: with ``capture=True`` (on the CPU
    the same static buffers, eagerly) every weight and parameter equals the ``capture=False`` run."""
    import copy

    from conftest import HelperPoisson, quiet_trainer

    from lightning_ntk import NTKWeightingCallback

    class Record(NTKWeightingCallback):
        def __init__(self, seen, **kw):
            super().__init__(**kw)
            self.seen = seen

        def update_weights(self, trainer, pl_module, batch):
            w = super().update_weights(trainer, pl_module, batch)
            self.seen.append(w.clone())
            return w

    torch.manual_seed(0)
    model = HelperPoisson()
    batches = [poisson_batch(n_r=12, seed=s, dtype=torch.float32) for s in range(4)]
    runs = {}
    for capture in (True, False):
        seen, m = [], copy.deepcopy(model)
        cb = Record(seen, update_every_n_steps=1, estimator=estimator, seed=0, capture=capture)
        quiet_trainer(tmp_path, max_steps=4, callbacks=[cb], logger=False).fit(
            m, torch.utils.data.DataLoader(batches, batch_size=None)
        )
        runs[capture] = (seen, m, cb)
    captured = [e for e in runs[True][2]._estimators.values() if isinstance(e, CapturedEstimator)]
    assert len(captured) == 1 and len(captured[0].calls) == 1
    assert not any(isinstance(e, CapturedEstimator) for e in runs[False][2]._estimators.values())
    for a, b in zip(runs[True][0], runs[False][0], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len({tuple(w.tolist()) for w in runs[True][0]}) == 4  # every batch gave its own weights
    for (name, a), b in zip(runs[True][1].state_dict().items(), runs[False][1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _weighted_traces(model, omegas, capture):
    """Traces through the callback's captured (or eager) estimator, with two different point weights in turn."""
    from lightning_ntk.estimators import Exact
    from lightning_ntk.measured import MeasuredEstimator, ntk_view_of

    est = (
        CapturedEstimator(Exact(), ntk_view_of, lambda m: m.terms)
        if capture
        else MeasuredEstimator(Exact(), ntk_view_of)
    )
    batch = poisson_batch(n_r=8)
    out = []
    for omega in omegas:
        model.set_point_weights({"pde": omega})
        out.append(torch.stack(list(est(model, batch).values.values())))
    return out, est


def test_point_weights_are_state_of_the_captured_traces_and_each_replay_uses_the_current_ones():
    from lightning_ntk.capture import captured_state

    torch.manual_seed(0)
    model = AutogradPoisson().double()
    omegas = [torch.rand(8, dtype=torch.float64) + 0.5 for _ in range(2)]
    captured, est = _weighted_traces(model, omegas, capture=True)
    eager, _ = _weighted_traces(model, omegas, capture=False)
    for got, want in zip(captured, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert not torch.equal(captured[0], captured[1])
    buffer = model.point_weights["pde"]
    assert any(t is buffer for t in captured_state(model))
    ((call, _),) = est.calls.values()
    assert len(call.entries) == 1  # the second ω was written into the same buffer: the same graph


def test_point_weights_stay_out_of_the_loss_in_eval_mode():
    torch.manual_seed(0)
    model = AutogradPoisson().double()
    batch = poisson_batch(n_r=8)
    plain = float(model.step_losses(batch).total.detach())
    model.set_point_weights({"pde": torch.full((8,), 3.0, dtype=torch.float64)})
    assert float(model.step_losses(batch).total.detach()) != pytest.approx(plain)
    model.eval()
    assert float(model.step_losses(batch).total.detach()) == plain


def test_the_callback_measures_a_subclass_ntk_view():
    from lightning_ntk.estimators import Exact
    from lightning_ntk.measured import MeasuredEstimator, ntk_view_of

    class Doubled(AutogradPoisson):
        def ntk_view(self, batch):
            outer = self

            class View(torch.nn.Module):
                terms = outer.terms

                def __init__(self):
                    super().__init__()
                    self.inner = outer

                def residuals(self, b):
                    return {k: 2 * v for k, v in outer.residuals(b).items()}

            return View()

    torch.manual_seed(0)
    model = Doubled().double()
    batch = poisson_batch(n_r=8)
    traces = MeasuredEstimator(Exact(), ntk_view_of)(model, batch).values
    plain = Exact()(model, batch).values
    for name in plain:
        torch.testing.assert_close(traces[name], 4 * plain[name], rtol=1e-12, atol=0)

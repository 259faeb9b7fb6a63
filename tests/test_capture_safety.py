"""The hot paths make no host synchronisation after their first call per batch signature (issue 28).

On a GPU each host read of a device value stalls the stream and is illegal inside a CUDA graph; a
CPU run counts the same reads as aten ops (``lightning_ntk.counting``), so this holds on any machine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, poisson_batch, quiet_trainer, repeat_loader

from lightning_ntk import NTKWeightingCallback, TraceAverager
from lightning_ntk.counting import SYNC_OPS, OpCounter
from lightning_ntk.estimators.hutchinson import hutchinson_traces
from lightning_ntk.estimators.hutchpp import hutchpp_traces


@pytest.mark.parametrize("estimator", [hutchinson_traces, hutchpp_traces])
def test_warm_sketches_read_nothing_on_the_host(estimator):
    torch.manual_seed(0)
    model, batch = AutogradPoisson(width=8), poisson_batch(n_r=12, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    estimator(model, batch, generator=generator)
    with OpCounter() as ops:
        estimator(model, batch, generator=generator)
    assert ops.syncs == 0, {op: n for op, n in ops.ops.items() if op in SYNC_OPS}
    assert ops.ops.get("lift_fresh", 0) == 0, ops.ops  # no per-call constants from the host


class CountingCallback(NTKWeightingCallback):
    """Counts the ops of every update after the first."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.counts: list[OpCounter] = []

    def update_weights(self, trainer, pl_module, batch):
        if trainer.global_step == 0:
            return super().update_weights(trainer, pl_module, batch)
        with OpCounter() as ops:
            weights = super().update_weights(trainer, pl_module, batch)
        self.counts.append(ops)
        return weights


@pytest.mark.parametrize(
    ("estimator", "averager"),
    [("exact", None), ("fd", TraceAverager(0.9)), ("hutchinson", None), ("hutchpp", TraceAverager(0.9))],
)
def test_the_callbacks_weight_update_reads_nothing_on_the_host(tmp_path, estimator, averager):
    """The whole update (estimate, reduction, validity check, averaging, weight rule, write into the
    buffer) on steps 1 and 2, with logging only at step 0's cadence."""
    torch.manual_seed(0)
    model = HelperPoisson()
    callback = CountingCallback(update_every_n_steps=1, estimator=estimator, trace_averager=averager, seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[callback], logger=False, log_every_n_steps=50)
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 3))
    assert len(callback.counts) == 2
    for ops in callback.counts:
        assert ops.syncs == 0, {op: n for op, n in ops.ops.items() if op in SYNC_OPS}
        # No tensor built from Python values per update (on a GPU: a copy from pageable host memory).
        assert ops.ops.get("lift_fresh", 0) == 0, ops.ops


def test_a_nan_trace_is_caught_before_that_steps_optimizer_step(tmp_path):
    """The validity flag is read after the update, before the parameters change: the error names the
    step and the term, and the parameters are those of the step before."""
    torch.manual_seed(0)
    model = HelperPoisson()
    good = poisson_batch(dtype=torch.float32)
    bad = (good[0], good[1].clone())
    bad[1][3] = float("nan")
    kept = {}

    class Keep(NTKWeightingCallback):
        def update_weights(self, trainer, pl_module, batch):
            kept["params"] = copy.deepcopy(pl_module.state_dict())
            return super().update_weights(trainer, pl_module, batch)

    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[Keep(update_every_n_steps=1)], logger=False)
    with pytest.raises(FloatingPointError, match=r"At optimizer step 2: the residual of term 'pde' is nan at row 3"):
        trainer.fit(model, torch.utils.data.DataLoader([good, good, bad], batch_size=None))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, kept["params"][name], rtol=0, atol=0, msg=name)


def test_skip_keeps_the_previous_weights_and_averages(tmp_path):
    """With ``on_nonfinite="skip"`` a bad update leaves the weights, the averager and ``last_values``
    as the good update before it left them."""
    torch.manual_seed(0)
    model = HelperPoisson()
    good = poisson_batch(dtype=torch.float32)
    bad = (good[0], good[1].clone())
    bad[1][0] = float("inf")
    averager = TraceAverager(0.5)
    seen = {}

    class Keep(NTKWeightingCallback):
        def update_weights(self, trainer, pl_module, batch):
            if trainer.global_step == 1:
                seen["weights"] = pl_module.ntk_weights.clone()
                seen["mean"] = self.trace_averager.mean.clone()
                seen["values"] = dict(self.last_values)
            return super().update_weights(trainer, pl_module, batch)

    ntk = Keep(update_every_n_steps=1, estimator="fd", trace_averager=averager, on_nonfinite="skip", seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ntk], logger=False)
    with pytest.warns(UserWarning, match=r"At optimizer step 1: .*'pde'.*Keeping the previous weights"):
        trainer.fit(model, torch.utils.data.DataLoader([good, bad], batch_size=None))
    torch.testing.assert_close(model.ntk_weights, seen["weights"], rtol=0, atol=0)
    torch.testing.assert_close(averager.mean, seen["mean"], rtol=0, atol=0)
    assert ntk.last_values == seen["values"]

"""Device checks that run only where CUDA is available (skipped on CPU-only CI)."""

import copy

import pytest
import torch
from conftest import (
    AutogradPoisson,
    HelperPoisson,
    StackedTwoField,
    poisson_batch,
    quiet_trainer,
    repeat_loader,
    two_field_batch,
)

from lightning_ntk import NTKWeightingCallback, TraceAverager, estimate_ntk_traces
from lightning_ntk.estimators import as_estimator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def to(batch, device):
    return tuple(t.to(device) for t in batch)


@pytest.mark.parametrize("cls", [HelperPoisson, AutogradPoisson])
def test_exact_traces_on_cuda_equal_cpu_and_take_the_gram_path(cls):
    # On CUDA the double backward of autograd-style residuals runs on autograd's device thread: the
    # recording must see those parameter uses too, or the Gram path would not be taken.
    model = cls().double()
    batch = poisson_batch(n_r=16)
    cpu = estimate_ntk_traces(model, batch).traces
    est = estimate_ntk_traces(copy.deepcopy(model).to(CUDA), to(batch, CUDA))
    assert set(est.info["paths"].values()) == {"gram"}
    for name in cpu:
        assert est.traces[name].device.type == "cuda"
        torch.testing.assert_close(est.traces[name].cpu(), cpu[name], rtol=1e-10, atol=0)


@pytest.mark.parametrize("cls", [HelperPoisson, AutogradPoisson])
def test_gram_path_makes_no_host_sync_once_its_layout_is_confirmed(cls):
    model = cls().to(CUDA)
    batch = to(poisson_batch(dtype=torch.float32), CUDA)
    estimate_ntk_traces(model, batch)  # first call: layouts and the check against the per-point path
    torch.cuda.set_sync_debug_mode("error")
    try:  # (the estimator itself: estimate_ntk_traces reads the values to warn about NaN)
        est = as_estimator("exact")(model, batch, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(est.info["paths"].values()) == {"gram"}


def test_cut_component_backwards_on_cuda_equal_cpu_read_nothing_on_the_host_and_capture():
    # The cut nodes' pre-hooks run on autograd's device thread; the check of what arrives at a cut
    # stays on the device, so a warm call makes no sync and replays from a CUDA graph.
    from test_capture import stacked_traces

    from lightning_ntk.capture import CapturedCall
    from lightning_ntk.memory import memory_of

    torch.manual_seed(0)
    model = StackedTwoField().double()
    batch = two_field_batch()
    cpu = estimate_ntk_traces(model, batch).traces
    model = model.to(CUDA)
    estimate_ntk_traces(model, to(batch, CUDA))  # confirms the layouts and the cuts
    assert any(e.gram is not None and e.gram.cuts for e in memory_of(model).exact.values())
    torch.cuda.set_sync_debug_mode("error")
    try:
        est = as_estimator("exact")(model, to(batch, CUDA), None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(est.info["paths"].values()) == {"gram"}
    for name in cpu:
        torch.testing.assert_close(est.traces[name].cpu(), cpu[name], rtol=1e-10, atol=0)
    call = CapturedCall(stacked_traces(model), state=lambda: list(model.parameters()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(3):
        step_batch = to(two_field_batch(seed=seed), CUDA)
        torch.testing.assert_close(call(*step_batch), stacked_traces(model)(*step_batch), rtol=1e-10, atol=0)
        opt.zero_grad()
        sum(r.square().mean() for r in model.residuals(step_batch).values()).backward()
        opt.step()
    (entry,) = call.entries.values()
    assert entry.graph is not None and entry.eager_reason is None, entry.eager_reason


@pytest.mark.parametrize("name", ["subsample", "hutchinson", "hutchpp", "fd", "auto"])
def test_sketches_run_on_cuda_with_a_cuda_generator(name):
    model = HelperPoisson().to(CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    option = {"num_points" if name == "subsample" else "num_probes": 6}
    est = estimate_ntk_traces(model, to(poisson_batch(dtype=torch.float32), CUDA), name, generator=g, **option)
    assert all(t.device.type == "cuda" and torch.isfinite(t) for t in est.traces.values())


def test_fd_estimator_makes_no_host_sync():
    model = HelperPoisson().to(CUDA)
    batch = to(poisson_batch(dtype=torch.float32), CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    estimate_ntk_traces(model, batch, "fd", generator=g)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        as_estimator("fd")(model, batch, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


class DeviceRecorder(NTKWeightingCallback):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, str, torch.dtype]] = []

    def update_weights(self, trainer, pl_module, batch):
        weights = super().update_weights(trainer, pl_module, batch)
        trace = next(iter(self.last_estimate.traces.values()))
        self.seen.append((pl_module.ntk_weights.device.type, self.rng.generator.device.type, trace.dtype))
        return weights


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_callback_on_gpu_keeps_state_on_device_and_traces_in_float32(tmp_path, precision):
    model = HelperPoisson()
    ntk = DeviceRecorder(update_every_n_steps=1, estimator="fd", trace_averager=TraceAverager(0.9), seed=0)
    trainer = quiet_trainer(tmp_path, accelerator="gpu", max_steps=3, callbacks=[ntk], precision=precision)
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 3))
    # (Lightning moves the module back to the CPU when fit ends, so the devices are read during fit.)
    assert ntk.seen == [("cuda", "cuda", torch.float32)] * 3
    assert model.term_weights["bc"] > 1.0


def test_captured_exact_traces_replay_a_graph_that_follows_parameter_updates():
    from test_capture import stacked_traces

    from lightning_ntk.capture import CapturedCall

    torch.manual_seed(0)
    model = AutogradPoisson(width=16).to(CUDA)
    call = CapturedCall(stacked_traces(model), state=lambda: list(model.parameters()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(3):
        batch = to(poisson_batch(n_r=64, seed=seed, dtype=torch.float32), CUDA)
        torch.testing.assert_close(call(*batch), stacked_traces(model)(*batch), rtol=1e-5, atol=0)
        opt.zero_grad()
        model.step_losses(batch).total.backward()
        opt.step()
    (entry,) = call.entries.values()
    assert entry.graph is not None and entry.eager_reason is None, entry.eager_reason


@pytest.mark.parametrize("estimator", ["exact", "fd"])
def test_callback_capture_on_cuda_gives_the_eager_weights(tmp_path, estimator):
    runs = []
    for capture in (False, True):
        torch.manual_seed(0)
        model = AutogradPoisson(width=16)
        ntk = NTKWeightingCallback(update_every_n_steps=1, estimator=estimator, capture=capture, seed=0)
        trainer = quiet_trainer(tmp_path / str(capture), accelerator="gpu", max_steps=4, callbacks=[ntk])
        trainer.fit(model, repeat_loader(poisson_batch(n_r=64, dtype=torch.float32), 4))
        runs.append((model, ntk))
    (eager, _), (captured, ntk) = runs
    torch.testing.assert_close(captured.ntk_weights, eager.ntk_weights, rtol=1e-4, atol=0)
    calls = [call for est in ntk._estimators.values() for call, _ in est.calls.values()]
    graphs = [e.graph for call in calls for e in call.entries.values()]
    assert graphs and all(g is not None for g in graphs)


def test_capture_step_on_cuda_trains_like_the_ordinary_module(tmp_path):
    from test_captured_step import Heat, batches

    runs = []
    for capture_step in (False, True):
        torch.manual_seed(0)
        model = Heat(capture_step=capture_step)
        trainer = quiet_trainer(tmp_path / str(capture_step), accelerator="gpu", max_steps=6)
        trainer.fit(model, torch.utils.data.DataLoader(batches(6), batch_size=None))
        runs.append(model)
    eager, captured = runs
    for a, b in zip(eager.parameters(), captured.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)  # capturable Adam: the same math in float64
    assert captured.causal["pde"].stage == eager.causal["pde"].stage
    (call,) = captured._captured_step.calls.values()
    assert all(e.graph is not None for e in call.entries.values())


def test_captured_traces_on_cuda_replay_with_two_different_point_weights():
    from lightning_ntk.estimators import Exact
    from lightning_ntk.measured import CapturedEstimator, MeasuredEstimator, ntk_view_of

    torch.manual_seed(0)
    model = AutogradPoisson(width=16).to(CUDA)
    batch = to(poisson_batch(n_r=64, dtype=torch.float32), CUDA)
    captured = CapturedEstimator(Exact(), ntk_view_of, lambda m: m.terms)
    eager = MeasuredEstimator(Exact(), ntk_view_of)
    results = []
    for seed in range(4):  # warm-up, capture and checked replay happen on the first calls; later ones replay
        omega = torch.rand(64, generator=torch.Generator().manual_seed(seed)).to(CUDA) + 0.5
        model.set_point_weights({"pde": omega})
        got = torch.stack(list(captured(model, batch).values.values()))
        want = torch.stack(list(eager(model, batch).values.values()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
        results.append(got)
    assert not torch.equal(results[-1], results[-2])
    ((call, _),) = captured.calls.values()
    (entry,) = call.entries.values()
    assert entry.graph is not None and entry.eager_reason is None, entry.eager_reason

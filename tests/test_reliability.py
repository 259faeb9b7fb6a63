"""Reliability: resume equals uninterrupted, DDP agreement, no leaks, compile, validate/predict, bad input."""

import copy
import json
import resource
import warnings
from pathlib import Path

import pytest
import torch
from conftest import AutogradPoisson, HelperPoisson, poisson_batch, quiet_trainer, repeat_loader
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_ntk import (
    NTKWeightingCallback,
    TraceAverager,
    WeightRule,
    estimate_ntk_traces,
    ntk_traces,
    trace_weights,
)

# ---------------------------------------------------------------- resume equals uninterrupted


def _fit(tmp_path, model, callback, steps, batch, accumulate=1, ckpt_path=None):
    trainer = quiet_trainer(
        tmp_path, max_steps=steps, callbacks=[callback], logger=False, accumulate_grad_batches=accumulate
    )
    trainer.fit(model, repeat_loader(batch, steps * accumulate + 4), ckpt_path=ckpt_path)
    return trainer


CALLBACKS = {
    "exact+ema": lambda: NTKWeightingCallback(update_every_n_steps=3, weight_rule=WeightRule(ema=0.5)),
    "fd+trace_ema": lambda: NTKWeightingCallback(
        update_every_n_steps=2, estimator="fd", trace_averager=TraceAverager(0.8), seed=4
    ),
}


@pytest.mark.parametrize("kind", list(CALLBACKS))
@pytest.mark.parametrize("stop", [3, 4])  # 3: the next step is an update; 4: between updates
@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, kind, stop, accumulate):
    # Guards against mistakes 3 and 8: weights reset to 1 (or 0) after a restart, and weights or
    # schedule not saved in checkpoints. Parameters, weights and averages must match bit-for-bit.
    batch = poisson_batch(n_r=10)
    torch.manual_seed(0)
    init = HelperPoisson().double()

    a_model, a_cb = copy.deepcopy(init), CALLBACKS[kind]()
    _fit(tmp_path / "a", a_model, a_cb, 9, batch, accumulate)

    b_model = copy.deepcopy(init)
    b_trainer = _fit(tmp_path / "b", b_model, CALLBACKS[kind](), stop, batch, accumulate)
    ckpt = tmp_path / "stop.ckpt"
    b_trainer.save_checkpoint(ckpt)
    resumed, r_cb = HelperPoisson().double(), CALLBACKS[kind]()  # fresh module and callback
    _fit(tmp_path / "b", resumed, r_cb, 9, batch, accumulate, ckpt_path=ckpt)

    for (name, p), q in zip(a_model.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=0, msg=name)
    torch.testing.assert_close(resumed.ntk_weights, a_model.ntk_weights, rtol=1e-12, atol=0)
    assert r_cb._last_update_step == a_cb._last_update_step
    if a_cb.trace_averager is not None:
        assert a_cb.trace_averager.mean is not None
        torch.testing.assert_close(r_cb.trace_averager.mean, a_cb.trace_averager.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(r_cb.trace_averager.stderr(), a_cb.trace_averager.stderr(), rtol=1e-12, atol=0)


PER_STEP = {
    # Each estimator at its own defaults, updated every step and averaged as the docs advise.
    name: (
        lambda name=name: NTKWeightingCallback(
            update_every_n_steps=1, estimator=name, trace_averager=TraceAverager(0.9), seed=7
        )
    )
    for name in ("fd", "exact", "subsample", "hutchinson", "hutchpp", "auto")
}
PER_STEP["grad_norm"] = lambda: NTKWeightingCallback(update_every_n_steps=1, estimator="grad_norm")


@pytest.mark.parametrize("kind", list(PER_STEP))
def test_resume_is_exact_for_every_estimator_with_many_points(tmp_path, kind):
    # With more than 64 points per term, fd's default subsamples points, and its one-time layout
    # check runs again in a resumed run's fresh module: it must not draw from the callback's stream.
    g = torch.Generator().manual_seed(3)
    batch = (torch.rand(160, 1, generator=g, dtype=torch.float64), torch.rand(200, 1, generator=g, dtype=torch.float64))
    torch.manual_seed(0)
    init = HelperPoisson().double()
    a_model, a_cb = copy.deepcopy(init), PER_STEP[kind]()
    _fit(tmp_path / "a", a_model, a_cb, 6, batch)
    b_trainer = _fit(tmp_path / "b", copy.deepcopy(init), PER_STEP[kind](), 3, batch)
    b_trainer.save_checkpoint(tmp_path / "stop.ckpt")
    resumed, r_cb = HelperPoisson().double(), PER_STEP[kind]()
    _fit(tmp_path / "b", resumed, r_cb, 6, batch, ckpt_path=tmp_path / "stop.ckpt")
    for (name, p), q in zip(a_model.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(resumed.ntk_weights, a_model.ntk_weights, rtol=0, atol=0)
    assert r_cb.last_weights == a_cb.last_weights


# ---------------------------------------------------------------- DDP agreement


class RankRecorder(NTKWeightingCallback):
    """Writes every update's weights and reduced traces to one file per rank."""

    def __init__(self, out_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def update_weights(self, trainer, pl_module, batch):
        weights = super().update_weights(trainer, pl_module, batch)
        record = {
            "step": trainer.global_step,
            "weights": weights.tolist(),
            "traces": self.last_traces,
        }
        with open(Path(self.out_dir) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return weights


class RankBatches(torch.utils.data.Dataset):
    """Rank r always gets batch r: different data on each rank, independent of the sampler."""

    def __init__(self, batches, length):
        self.batches, self.length = batches, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return self.batches[rank]


@pytest.mark.slow  # spawns two processes (~8 s); CI runs it
def test_ddp_ranks_apply_identical_weights_from_summed_traces(tmp_path):
    # Guards against mistake 9: each DDP rank applying different weights.
    batch_a, batch_b = poisson_batch(n_r=8, seed=1), poisson_batch(n_r=8, seed=2)
    torch.manual_seed(0)
    model = HelperPoisson().double()
    expected_step0 = {
        name: float(ntk_traces(model, batch_a)[name] + ntk_traces(model, batch_b)[name]) for name in model.terms
    }
    loader = torch.utils.data.DataLoader(RankBatches([batch_a, batch_b], 12), batch_size=None)
    callback = RankRecorder(str(tmp_path), update_every_n_steps=1, weight_rule=WeightRule(ema=0.5))
    trainer = quiet_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
        callbacks=[callback],
        logger=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, loader)
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [0, 1, 2]
    for rec0, rec1 in zip(*ranks, strict=True):
        assert rec0["weights"] == rec1["weights"]
        assert rec0["traces"] == rec1["traces"]
    # The logged (and used) trace is the sum over ranks: the NTK trace of the global batch.
    assert ranks[0][0]["traces"] == pytest.approx(expected_step0, rel=1e-10)


# ---------------------------------------------------------------- no leaks


class GradRecorder(Callback):
    def __init__(self):
        self.grads = []
        self.weights = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.detach().clone() for p in pl_module.parameters()])
        self.weights.append(pl_module.ntk_weights.detach().clone())


@pytest.mark.parametrize("estimator", ["exact", "fd", "hutchpp", "grad_norm"])
def test_param_grad_is_that_of_the_weighted_loss_alone(tmp_path, estimator):
    # Guards against mistake 4: gradients of the weight computation leaking into the training step.
    # If the trace computation were part of the loss graph or left anything in .grad, the gradient
    # would differ from that of Σ w_i L_i computed by hand with the same (constant) weights.
    batch = poisson_batch(n_r=10)
    torch.manual_seed(0)
    model = HelperPoisson().double()
    reference = copy.deepcopy(model)
    recorder = GradRecorder()
    ntk = NTKWeightingCallback(update_every_n_steps=1, estimator=estimator, seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[recorder, ntk], logger=False)
    trainer.fit(model, repeat_loader(batch, 1))
    reference.set_term_weights(recorder.weights[0])
    loss = reference.step_losses(batch).total
    loss.backward()
    for got, p in zip(recorder.grads[0], reference.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-12, atol=0)


class RssProbe(Callback):
    def __init__(self):
        self.rss = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step in (200, 1000):
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            self.rss[trainer.global_step] = pages * resource.getpagesize()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
@pytest.mark.slow
def test_memory_does_not_grow_over_1000_updates(tmp_path):
    probe = RssProbe()
    ntk = NTKWeightingCallback(update_every_n_steps=1)
    trainer = quiet_trainer(tmp_path, max_steps=1000, callbacks=[ntk, probe], logger=False)
    trainer.fit(HelperPoisson(), repeat_loader(poisson_batch(n_r=8, dtype=torch.float32), 1000))
    growth = probe.rss[1000] - probe.rss[200]
    assert growth < 20 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 800 updates"


# ---------------------------------------------------------------- validate and predict


@pytest.mark.parametrize("base", [HelperPoisson, AutogradPoisson])
def test_validate_and_predict_work_under_inference_mode_and_keep_weights(tmp_path, base):
    class Validated(base):
        def validation_step(self, batch, batch_idx):
            return self.log_validation_losses(batch)

    model = Validated()
    model.set_term_weights({"bc": 5.0})
    batch = poisson_batch(dtype=torch.float32)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[NTKWeightingCallback(1)], logger=False)
    (metrics,) = trainer.validate(model, repeat_loader(batch, 1), verbose=False)
    assert {"val/loss/bc", "val/loss/pde", "val/loss/total"} <= set(metrics)
    total = model.step_losses(batch).total
    assert metrics["val/loss/total"] == pytest.approx(float(total.detach()), rel=1e-5)
    (pred,) = trainer.predict(model, repeat_loader(batch, 1))
    assert set(pred) == {"bc", "pde"} and pred["pde"].shape == (12, 1)
    assert model.term_weights == {"bc": 5.0, "pde": 1.0}


def test_a_fit_without_validation_data_says_nothing_about_validation(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(tmp_path, max_steps=1, logger=False)
        trainer.fit(HelperPoisson().double(), repeat_loader(poisson_batch(), 1))
    assert not [w for w in caught if "validation_step" in str(w.message)]


# ---------------------------------------------------------------- torch.compile


def test_compiled_network_gives_the_same_weights_as_eager(tmp_path):
    # Guards against mistake 7: weights frozen when a compiled graph captures the step or weights.
    batch = poisson_batch(dtype=torch.float32)
    torch.manual_seed(0)
    eager = HelperPoisson()
    compiled = copy.deepcopy(eager)
    compiled.net = torch.compile(compiled.net, backend="aot_eager")
    runs = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        recorder = GradRecorder()
        ntk = NTKWeightingCallback(update_every_n_steps=2)
        quiet_trainer(tmp_path, max_steps=5, callbacks=[recorder, ntk], logger=False).fit(
            model, repeat_loader(batch, 5)
        )
        runs[name] = torch.stack(recorder.weights)
    assert len({tuple(w.tolist()) for w in runs["compiled"]}) == 3  # updates at steps 0, 2 and 4
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-4, atol=0)


# ---------------------------------------------------------------- bad input


def test_batch_on_the_wrong_device_is_a_clear_error():
    model = HelperPoisson().to(torch.device("meta"))
    with pytest.raises(ValueError, match="is on cpu, but the module's parameters are on meta"):
        ntk_traces(model, poisson_batch(dtype=torch.float32))


def test_on_nonfinite_skip_keeps_previous_weights_and_warns(tmp_path):
    model = HelperPoisson()
    good = poisson_batch(dtype=torch.float32)
    bad = (good[0], good[1].clone())
    bad[1][0] = float("inf")
    initial = copy.deepcopy(model)
    ntk = NTKWeightingCallback(update_every_n_steps=1, on_nonfinite="skip", weight_rule=WeightRule())
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ntk], logger=False)
    with pytest.warns(UserWarning, match=r"At optimizer step 1: .*term 'pde'.*Keeping the previous weights"):
        trainer.fit(model, torch.utils.data.DataLoader([good, bad], batch_size=None))
    # Step 0 set the weights from the initial parameters; step 1 (inf) must leave exactly those.
    expected = trace_weights(ntk_traces(initial, good))
    assert model.term_weights == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-5)


def test_bad_on_nonfinite():
    with pytest.raises(MisconfigurationException, match="on_nonfinite"):
        NTKWeightingCallback(on_nonfinite="ignore")


def test_load_from_checkpoint_with_renamed_terms_fails_clearly(tmp_path):
    model = HelperPoisson()
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[NTKWeightingCallback(1)], logger=False)
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 1))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)

    class Renamed(HelperPoisson):
        def __init__(self):
            super().__init__()
            self._terms = ("boundary", "pde")

    with pytest.raises(ValueError, match=r"written for terms \['bc', 'pde'\]"):
        Renamed.load_from_checkpoint(path)


def test_the_nonfinite_message_names_the_row_once_and_says_not_finite_once(tmp_path):
    model = HelperPoisson()
    good = poisson_batch(dtype=torch.float32)
    bad = (good[0], good[1].clone())
    bad[1][:] = float("nan")  # every residual row of 'pde' is NaN
    ntk = NTKWeightingCallback(update_every_n_steps=1, on_nonfinite="skip")
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ntk], logger=False)
    with pytest.warns(UserWarning) as seen:
        trainer.fit(model, torch.utils.data.DataLoader([good, bad], batch_size=None))
    (message,) = [str(w.message) for w in seen if "At optimizer step" in str(w.message)]
    n = bad[1].shape[0]
    assert f"nan at row 0, one of {n} non-finite rows ({n} rows in all)" in message, message
    assert message.count("not finite") == 1, message


def test_skipping_says_once_that_the_model_itself_is_not_finite(tmp_path):
    class Diverge(Callback):  # the parameters go NaN after step 1, as in a diverged run
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    module.net[0].weight.fill_(float("nan"))

    model = HelperPoisson()
    ntk = NTKWeightingCallback(update_every_n_steps=1, on_nonfinite="skip")
    trainer = quiet_trainer(tmp_path, max_steps=6, callbacks=[Diverge(), ntk], logger=False)
    with pytest.warns(UserWarning) as seen:
        trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 6))
    messages = [str(w.message) for w in seen if "At optimizer step" in str(w.message)]
    assert len(messages) == 1, messages  # steps 3, 4, 5 all fail; it is said once
    assert "parameters of the model are not finite" in messages[0] and "'net.0.weight'" in messages[0]


def test_estimate_ntk_traces_warns_naming_the_term_with_a_nonfinite_trace():
    model = HelperPoisson()
    x_b, x_r = poisson_batch(dtype=torch.float32)
    x_r = x_r.clone()
    x_r[2] = float("nan")
    with pytest.warns(UserWarning, match=r"term 'pde'.* not finite"):
        est = estimate_ntk_traces(model, (x_b, x_r))
    assert not torch.isfinite(est.traces["pde"]) and torch.isfinite(est.traces["bc"])


def _guide_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "docs/guides/ddp_and_checkpoints.md").read_text()
    blocks = text.split("```python\n")[1:]
    (block,) = [b.split("```")[0] for b in blocks if marker in b]
    return block


@pytest.mark.parametrize("loader", ["guide's FreshPoints", "a DataLoader of distinct batches"])
def test_resume_is_exact_with_the_guides_stateful_loader_and_not_with_a_plain_list(tmp_path, loader):
    space = {"torch": torch}
    exec(_guide_block("class FreshPoints"), space)

    def make(g):
        return (torch.tensor([[0.0], [1.0]], dtype=torch.float64), torch.rand(10, 1, generator=g, dtype=torch.float64))

    def data():
        if loader == "a DataLoader of distinct batches":
            batches = [make(torch.Generator().manual_seed(k)) for k in range(8)]
            return torch.utils.data.DataLoader(batches, batch_size=None)
        return space["FreshPoints"](make, steps_per_epoch=8)

    def fit(root, model, steps, ckpt_path=None):
        trainer = quiet_trainer(root, max_steps=steps, callbacks=[NTKWeightingCallback(update_every_n_steps=2)])
        trainer.fit(model, data(), ckpt_path=ckpt_path)
        return trainer

    torch.manual_seed(0)
    init = HelperPoisson().double()
    straight = copy.deepcopy(init)
    fit(tmp_path / "a", straight, 6)
    stopped = fit(tmp_path / "b", copy.deepcopy(init), 3)
    stopped.save_checkpoint(tmp_path / "stop.ckpt")
    resumed = HelperPoisson().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's "not resumable" notice for the DataLoader
        fit(tmp_path / "b", resumed, 6, ckpt_path=tmp_path / "stop.ckpt")
    same = all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters(), strict=True))
    assert same == (loader == "guide's FreshPoints")

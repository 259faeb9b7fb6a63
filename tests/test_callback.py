import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import HelperPoisson, poisson_batch, quiet_trainer, reference_traces, repeat_loader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ntk import (
    Auto,
    Exact,
    FiniteDifference,
    Hutchinson,
    HutchPlusPlus,
    NTKWeightingCallback,
    Subsample,
    TraceAverager,
    WeightRule,
    ntk_traces,
    trace_weights,
)
from lightning_ntk.estimators import as_estimator


class Recording(HelperPoisson):
    """Records the weights each training step actually used, and supports validation."""

    def __init__(self, lr: float = 1e-3):
        super().__init__()
        self.lr = lr
        self.used: list[dict[str, float]] = []

    def training_step(self, batch, batch_idx):
        self.used.append(self.term_weights)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        total = self.step_losses(batch).total
        self.log("val/total", total, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Counting(NTKWeightingCallback):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.update_steps: list[int] = []

    def update_weights(self, trainer, pl_module, batch):
        self.update_steps.append(trainer.global_step)
        return super().update_weights(trainer, pl_module, batch)


def test_step0_trains_with_ntk_weights_computed_before_the_forward(tmp_path):
    # Guards against mistake 3: weights unset (or 1) between the first step and the first update.
    model = Recording()
    batch = poisson_batch(dtype=torch.float32)
    traces = {k: float(v) for k, v in ntk_traces(copy.deepcopy(model), batch).items()}
    expected = {k: sum(traces.values()) / v for k, v in traces.items()}  # the default rule, by hand
    trainer = quiet_trainer(tmp_path, max_steps=3, logger=False, callbacks=[NTKWeightingCallback(100)])
    trainer.fit(model, repeat_loader(batch, 3))
    for name, value in expected.items():
        assert model.used[0][name] == pytest.approx(value, rel=1e-5)
    assert model.used[0]["bc"] > 1.0


def test_fit_writes_tensorboard_scalars_and_checkpoint_holds_weights(tmp_path):
    model = Recording()
    ntk = NTKWeightingCallback(update_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, max_steps=5, callbacks=[ntk])
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 5))

    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for term in ("bc", "pde"):
        for kind in ("trace", "weight"):
            tag = f"ntk/{kind}/{term}"
            assert tag in tags
            assert [e.step for e in events.Scalars(tag)] == [0, 2, 4]
    last_bc = events.Scalars("ntk/weight/bc")[-1].value
    assert last_bc == pytest.approx(model.term_weights["bc"], rel=1e-6)
    assert {"loss/bc", "loss/pde", "loss/total"} <= tags

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    torch.testing.assert_close(ckpt["state_dict"]["ntk_weights"], model.ntk_weights)
    (state,) = [v for k, v in ckpt["callbacks"].items() if "NTKWeightingCallback" in k]
    assert state["last_update_step"] == 4
    # Guards against mistake 8: weights not restored without the callback.
    restored = Recording.load_from_checkpoint(path)
    assert restored.term_weights == pytest.approx(model.term_weights)
    assert restored.term_weights["bc"] != 1.0


def test_state_dict_round_trip():
    a = NTKWeightingCallback(update_every_n_steps=3, monitor_only=True, weight_rule=WeightRule(ema=0.5))
    a._last_update_step = 9
    a._monitored_weights = torch.tensor([2.0, 1.0])
    b = NTKWeightingCallback(update_every_n_steps=3, monitor_only=True, weight_rule=WeightRule(ema=0.5))
    b.load_state_dict(a.state_dict())
    assert b._last_update_step == 9
    torch.testing.assert_close(b._monitored_weights, a._monitored_weights)


def test_validation_and_sanity_checks_do_not_change_weights(tmp_path):
    # Guards against mistake 5: validation or sanity passes changing the training weights.
    model = Recording()
    ntk = Counting(update_every_n_steps=100)
    batch = poisson_batch(dtype=torch.float32)
    trainer = quiet_trainer(
        tmp_path, max_steps=4, callbacks=[ntk], val_check_interval=2, num_sanity_val_steps=1, logger=False
    )
    trainer.fit(model, repeat_loader(batch, 4), repeat_loader(batch, 1))
    assert ntk.update_steps == [0]
    before = model.term_weights
    trainer.validate(model, repeat_loader(batch, 1), verbose=False)
    assert model.term_weights == before
    assert ntk.update_steps == [0]


def test_gradient_accumulation_updates_once_per_optimizer_step(tmp_path):
    model = Recording()
    ntk = Counting(update_every_n_steps=1)
    trainer = quiet_trainer(tmp_path, max_steps=4, accumulate_grad_batches=3, callbacks=[ntk], logger=False)
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 12))
    assert ntk.update_steps == [0, 1, 2, 3]
    # Every micro-batch of one optimizer step used the same weights.
    for k in range(4):
        assert model.used[3 * k] == model.used[3 * k + 1] == model.used[3 * k + 2]


def test_ema_and_mean_trace_in_the_callback(tmp_path):
    model = Recording(lr=0.0)  # parameters stay put, so every update sees the same traces
    batch = poisson_batch(dtype=torch.float32)
    traces = ntk_traces(copy.deepcopy(model), batch)
    lam = trace_weights(traces, mode="mean_trace", num_rows={"bc": 2, "pde": 12})
    ntk = NTKWeightingCallback(update_every_n_steps=1, weight_rule=WeightRule(mode="mean_trace", ema=0.5))
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ntk], logger=False)
    trainer.fit(model, repeat_loader(batch, 2))
    for name in ("bc", "pde"):
        w1 = 0.5 * 1.0 + 0.5 * float(lam[name])
        assert model.used[0][name] == pytest.approx(w1, rel=1e-5)
        assert model.used[1][name] == pytest.approx(0.5 * w1 + 0.5 * float(lam[name]), rel=1e-5)


def test_clamps_in_the_callback(tmp_path):
    model = Recording()
    ntk = NTKWeightingCallback(update_every_n_steps=1, weight_rule=WeightRule(max_weight=2.5, min_weight=2.0))
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[ntk], logger=False)
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 1))
    assert model.used[0] == {"bc": 2.5, "pde": 2.0}


def test_monitor_only_never_changes_weights(tmp_path):
    model = Recording()
    model.set_term_weights({"bc": 7.0})
    ntk = NTKWeightingCallback(update_every_n_steps=1, monitor_only=True, weight_rule=WeightRule())
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[ntk])
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 3))
    assert all(u == {"bc": 7.0, "pde": 1.0} for u in model.used)
    assert ntk.last_weights["bc"] > 1.0 and ntk.last_weights["bc"] != 7.0
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert len(events.Scalars("ntk/weight/bc")) == 3


def test_nonfinite_trace_raises_at_that_step_naming_the_term(tmp_path):
    model = Recording()
    good = poisson_batch(dtype=torch.float32)
    bad = (good[0], good[1].clone())
    bad[1][3] = float("nan")
    loader = torch.utils.data.DataLoader([good, good, bad], batch_size=None)
    trainer = quiet_trainer(
        tmp_path, max_steps=3, callbacks=[NTKWeightingCallback(update_every_n_steps=1)], logger=False
    )
    match = r"At optimizer step 2: the residual of term 'pde' is nan at row 3, the only non-finite row "
    with pytest.raises(FloatingPointError, match=match) as err:
        trainer.fit(model, loader)
    assert "'bc'" not in str(err.value)  # the exact path keeps the other terms' traces finite


@pytest.mark.parametrize("estimator", ["exact", "fd", "hutchinson", "subsample", "hutchpp"])
def test_a_nan_row_is_blamed_on_its_term_and_row_by_every_estimator(tmp_path, estimator):
    class ThreeTerms(Recording):
        def __init__(self):
            super().__init__()
            self._terms = ("ic", "bc", "pde")
            self.register_buffer("ntk_weights", torch.ones(3))

        def residuals(self, batch):
            out = super().residuals(batch)
            return {"ic": self.net(batch[0] * 0.5), **out}

    good = poisson_batch(dtype=torch.float32)
    bad = (good[0], good[1].clone())
    bad[1][7] = float("nan")
    ntk = NTKWeightingCallback(update_every_n_steps=1, estimator=estimator, on_nonfinite="skip", seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ntk], logger=False)
    with pytest.warns(UserWarning, match="At optimizer step 1: ") as caught:
        trainer.fit(ThreeTerms(), torch.utils.data.DataLoader([good, bad], batch_size=None))
    [message] = [str(w.message) for w in caught if "At optimizer step" in str(w.message)]
    want = "At optimizer step 1: the residual of term 'pde' is nan at row 7, the only non-finite row ("
    assert message.startswith(want), message
    assert "'ic'" not in message and "'bc'" not in message
    assert "Keeping the previous weights" in message


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"update_every_n_steps": 0}, "update_every_n_steps"),
        ({"update_every_n_steps": 2.0}, "update_every_n_steps"),
        ({"estimator": "nope"}, "Unknown NTK trace estimator 'nope'"),
        ({"estimator": 3}, "Unknown NTK trace estimator 3"),
        ({"weight_rule": "trace"}, "`weight_rule` must be a lightning_ntk.WeightRule"),
        ({"trace_averager": 0.99}, "`trace_averager` must be a lightning_ntk.TraceAverager"),
        ({"seed": "x"}, "seed"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        NTKWeightingCallback(**kwargs)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: WeightRule(mode="max"), "Unknown weighting mode 'max'"),
        (lambda: WeightRule(ema=1.0), r"`ema` must be a number in \[0, 1\)"),
        (lambda: WeightRule(ema=-0.1), "`ema`"),
        (lambda: WeightRule(min_weight=10.0, max_weight=1.0), "larger than"),
        (lambda: WeightRule(min_weight=0.0), "min_weight"),
        (lambda: TraceAverager(1.0), "beta"),
        (lambda: Exact(chunk_size=0), "chunk_size"),
        (lambda: Exact(paths=["fast"]), "paths"),
        (lambda: Hutchinson(num_probes=0), "num_probes"),
        (lambda: HutchPlusPlus(num_probes=2.5), "num_probes"),
        (lambda: Subsample(num_points=0), "num_points"),
        (lambda: FiniteDifference(points_per_probe=0), "points_per_probe"),
        (lambda: FiniteDifference(points_per_probe="many"), "points_per_probe"),
        (lambda: FiniteDifference(step_scale=0.0), "step_scale"),
        (lambda: Auto(max_exact_work=-1), "max_exact_work"),
        (lambda: as_estimator("nope"), "Unknown NTK trace estimator"),
        (lambda: as_estimator("hutchinson", generator=None), "generator"),
        (lambda: as_estimator("hutchinson", chunk_size=4), r"'hutchinson' \(Hutchinson\) does not take"),
    ],
)
def test_callback_parts_check_their_options_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_an_option_an_estimator_class_does_not_take_fails_when_built():
    with pytest.raises(TypeError, match="chunk_size"):
        Hutchinson(chunk_size=4)
    with pytest.raises(TypeError, match="num_probes"):
        Exact(num_probes=8)


def test_estimator_names_stand_for_their_classes_with_defaults():
    assert NTKWeightingCallback(estimator="fd").estimator == FiniteDifference()
    assert NTKWeightingCallback(estimator="hutchinson").estimator == Hutchinson(num_probes=16)
    assert NTKWeightingCallback().estimator == Exact()
    fd = FiniteDifference(num_probes=2, points_per_probe=5)
    assert NTKWeightingCallback(estimator=fd).estimator is fd


def test_setup_rejects_a_plain_lightning_module(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[NTKWeightingCallback()], logger=False)
    with pytest.raises(MisconfigurationException, match=r"needs a lightning_ntk.PINNModule, got Plain"):
        trainer.fit(Plain(), repeat_loader(torch.zeros(2, 1), 1))


class Capturing(NTKWeightingCallback):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw: list[dict[str, float]] = []

    def update_weights(self, trainer, pl_module, batch):
        weights = super().update_weights(trainer, pl_module, batch)
        self.raw.append({k: float(v) for k, v in self.last_estimate.traces.items()})
        return weights


def test_trace_ema_averages_the_estimates_before_weighting(tmp_path):
    model = Recording(lr=0.0)
    ntk = Capturing(
        update_every_n_steps=1,
        estimator=FiniteDifference(num_probes=1),
        trace_averager=TraceAverager(0.5, start="estimate"),
        weight_rule=WeightRule(),
        seed=3,
    )
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[ntk])
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 3))
    mean = dict(ntk.raw[0])
    for raw in ntk.raw[1:]:
        mean = {k: mean[k] + 0.5 * (raw[k] - mean[k]) for k in mean}
    assert ntk.last_traces == pytest.approx(mean, rel=1e-5)
    expected = trace_weights(mean)
    assert model.used[2] == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-5)
    assert len({raw["pde"] for raw in ntk.raw}) == 3  # fresh probes every step
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    # One probe has no standard error of its own: unknown (NaN) until a second estimate shows the
    # spread. Then Var(mean_k) = c_k σ² with c_0 = 1, c_k = β² c_{k−1} + (1−β)², and σ² from the
    # deviations δ_k² / (1 + c_{k−1}), averaged with weights (1−β)β^(k−j) / (1 − β^k).
    beta, mean, coef, total, want = 0.5, ntk.raw[0]["pde"], 1.0, 0.0, [float("nan")]
    for k, raw in enumerate(ntk.raw[1:], start=1):
        delta = raw["pde"] - mean
        total = beta * total + (1 - beta) * delta**2 / (1 + coef)
        mean += (1 - beta) * delta
        coef = beta**2 * coef + (1 - beta) ** 2
        want.append((coef * total / (1 - beta**k)) ** 0.5)
    stderr = [e.value for e in events.Scalars("ntk/trace_stderr/pde")]
    assert stderr == pytest.approx(want, rel=1e-4, abs=1e-6, nan_ok=True) and want[-1] > 0


def test_per_step_sketch_starts_from_exact_traces(tmp_path):
    # A single fd probe can be off by a factor of ten; the default start="exact" makes the first
    # weights exact and then lets the sketch follow the drift.
    model = Recording(lr=0.0)
    batch = poisson_batch(dtype=torch.float32)
    ntk = Capturing(
        update_every_n_steps=1, estimator="fd", trace_averager=TraceAverager(0.5), weight_rule=WeightRule(), seed=3
    )
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[ntk])
    trainer.fit(model, repeat_loader(batch, 2))
    exact = {k: float(v) for k, v in reference_traces(model, batch).items()}
    assert ntk.raw[0] == pytest.approx(exact, rel=1e-5)
    want = {k: float(v) for k, v in trace_weights(exact).items()}
    assert model.used[0] == pytest.approx(want, rel=1e-5)
    assert ntk.raw[1] != pytest.approx(exact, rel=1e-5)  # the second update is the sketch's
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    stderr = [e.value for e in events.Scalars("ntk/trace_stderr/pde")]
    assert stderr[0] == 0.0 and stderr[1] > 0  # exact, then the average of exact and one probe


def test_exact_estimator_logs_zero_stderr_and_respects_log_every_n_steps(tmp_path):
    model = Recording()
    trainer = quiet_trainer(
        tmp_path, max_steps=6, log_every_n_steps=3, callbacks=[NTKWeightingCallback(update_every_n_steps=1)]
    )
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 6))
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("ntk/weight/bc")] == [0, 3]
    assert all(e.value == 0.0 for e in events.Scalars("ntk/trace_stderr/bc"))


def test_generator_state_round_trip(tmp_path):
    model = Recording()
    a = NTKWeightingCallback(update_every_n_steps=1, estimator="hutchinson", seed=5)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[a], logger=False)
    trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 2))
    b = NTKWeightingCallback(update_every_n_steps=1, estimator="hutchinson", seed=5)
    b.rng.start(torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    assert torch.equal(torch.rand(4, generator=a.rng.generator), torch.rand(4, generator=b.rng.generator))


def test_custom_scalars_layout_groups_every_term():
    from lightning_ntk.tensorboard import custom_scalars_layout

    layout = custom_scalars_layout(["bc", "pde"])
    assert layout["lightning_ntk"]["weights"] == ["Multiline", ["ntk/weight/bc", "ntk/weight/pde"]]
    assert layout["lightning_ntk term pde"]["top eigenvalues"] == ["Multiline", [r"ntk/eig/pde/\d+"]]


def test_a_batch_of_another_dtype_fails_before_the_first_step_naming_both_dtypes(tmp_path):
    from conftest import AutogradPoisson

    model = AutogradPoisson().double()
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[NTKWeightingCallback()], logger=False)
    with pytest.raises(TypeError, match=r"is torch.float32, but the module's parameters are torch.float64"):
        trainer.fit(model, repeat_loader(poisson_batch(dtype=torch.float32), 1))

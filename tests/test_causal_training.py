"""Causal weighting in training: PINNModule(causal=...) and the callback, against hand computations."""

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer, reference_point_norms, repeat_loader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_ntk import (
    CausalWeighting,
    NTKWeightingCallback,
    PINNModule,
    TraceAverager,
    WeightRule,
    tags,
    trace_weights,
)
from lightning_ntk.causal import CausalResiduals
from lightning_ntk.counting import OpCounter

TIMES = [0.05, 0.1, 0.2, 0.3, 0.55, 0.7, 0.8, 0.85, 0.9, 0.99]  # 3, 1, 2, 4 points in 4 chunks
EPS = 3.0


class Heat(PINNModule):
    """``u_t − 0.1 u_x + u − cos 4t`` with an initial condition; the PDE term causal in t (column 1)."""

    def __init__(self, causal=True, schedule=None, advance_at=0.99, capture_step=False):
        cw = CausalWeighting(time_column=1, num_chunks=4, epsilon=EPS, epsilon_schedule=schedule, advance_at=advance_at)
        super().__init__(terms=["ic", "pde"], causal={"pde": cw} if causal else None, capture_step=capture_step)
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1)).double()

    def residuals(self, batch):
        x = batch["pde"].clone().requires_grad_(True)
        u = self.net(x)
        du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
        pde = du[:, 1] - 0.1 * du[:, 0] + u[:, 0] - torch.cos(4 * x[:, 1])
        return {"ic": self.net(batch["ic"])[:, 0] - 1.0, "pde": pde}

    def residual_points(self, batch):
        return {"pde": batch["pde"]}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def heat_batch():
    g = torch.Generator().manual_seed(5)
    t = torch.tensor(TIMES, dtype=torch.float64)
    pde = torch.stack([torch.rand(10, generator=g, dtype=torch.float64), t], 1)
    ic = torch.stack([torch.rand(4, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)], 1)
    return {"ic": ic, "pde": pde}


def chunks_by_hand(eps=EPS):
    return [[n for n, t in enumerate(TIMES) if min(int(t * 4), 3) == k] for k in range(4)], eps


def causal_by_hand(model, batch, eps=EPS):
    """Chunk losses, w_k = exp(−ε Σ_{j<k} L_j), and the causal trace N · mean_k(w_k · mean_{n∈k} K_nn)."""
    members, _ = chunks_by_hand()
    r = model.residuals(batch)["pde"].detach()
    losses = [sum(float(r[n]) ** 2 for n in m) / len(m) for m in members]
    weights = [math.exp(-eps * sum(losses[:k])) for k in range(4)]
    norms = reference_point_norms(model, batch)["pde"]
    trace = 10 * sum(w * sum(float(norms[n]) for n in m) / len(m) for w, m in zip(weights, members, strict=True)) / 4
    return losses, weights, trace


def test_the_module_loss_of_a_causal_term_is_the_weighted_chunk_mean_with_no_gradient_through_the_weights():
    torch.manual_seed(0)
    model, batch = Heat(), heat_batch()
    losses, weights, _ = causal_by_hand(model, batch)
    terms = model.step_losses(batch).losses
    want = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / 4
    assert float(terms["pde"].detach()) == pytest.approx(want, rel=1e-12)
    # The gradient is that of Σ_k w_k L_k / 4 with the weights held constant ...
    members, _ = chunks_by_hand()
    r = model.residuals(batch)["pde"]
    const = sum(w * sum(r[n] ** 2 for n in m) / len(m) for w, m in zip(weights, members, strict=True)) / 4
    grads = torch.autograd.grad(terms["pde"], list(model.parameters()), retain_graph=True)
    want_grads = torch.autograd.grad(const, list(model.parameters()), retain_graph=True)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
    # ... and not that of the loss with the weights differentiated (which the test can tell apart).
    chunk_l = [sum(r[n] ** 2 for n in m) / len(m) for m in members]
    live = sum(torch.exp(-EPS * sum(chunk_l[:k], torch.zeros((), dtype=r.dtype))) * chunk_l[k] for k in range(4)) / 4
    live_grads = torch.autograd.grad(live, list(model.parameters()))
    assert max(float((g - w).abs().max()) for g, w in zip(grads, live_grads, strict=True)) > 1e-6


@pytest.mark.parametrize("estimator", ["exact", "grad_norm"])
def test_the_callback_weights_the_causal_term_by_its_causal_measure(tmp_path, estimator):
    torch.manual_seed(0)
    model, batch = Heat(), heat_batch()
    _, weights, causal_trace = causal_by_hand(model, batch)
    plain = copy.deepcopy(model)
    cb = NTKWeightingCallback(update_every_n_steps=1, estimator=estimator, weight_rule=WeightRule())
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[cb], logger=False)
    trainer.fit(model, repeat_loader(batch, 2))
    if estimator == "exact":
        ic = float(reference_point_norms(plain, batch)["ic"].sum())
        want = {"ic": ic, "pde": causal_trace}
    else:  # ‖∇ Σ_k w_k L_k / 4‖ with the hand weights as constants, and ‖∇ mean(r_ic²)‖
        members, _ = chunks_by_hand()
        res = plain.residuals(batch)
        loss = sum(w * sum(res["pde"][n] ** 2 for n in m) / len(m) for w, m in zip(weights, members, strict=True)) / 4
        norm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(plain.parameters()))]).norm()
        ic = torch.cat(
            [g.reshape(-1) for g in torch.autograd.grad(res["ic"].square().mean(), list(plain.parameters()))]
        )
        want = {"ic": float(ic.norm()), "pde": float(norm)}
    assert cb.last_traces == pytest.approx(want, rel=1e-10)
    as64 = {name: torch.tensor(v, dtype=torch.float64) for name, v in want.items()}
    expected = {name: float(w) for name, w in trace_weights(as64).items()}
    assert cb.last_weights == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("estimator", ["fd", "subsample", "hutchinson", "hutchpp", "auto"])
def test_every_estimator_trains_a_causal_module_through_the_callback(tmp_path, estimator):
    torch.manual_seed(0)
    model, batch = Heat(), heat_batch()
    cb = NTKWeightingCallback(update_every_n_steps=1, estimator=estimator, trace_averager=TraceAverager(0.9), seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[cb], logger=False)
    trainer.fit(model, repeat_loader(batch, 4))
    assert all(math.isfinite(v) and v > 0 for v in cb.last_weights.values())
    assert isinstance(model._views["ntk"], CausalResiduals) and model._views["ntk"].inner is model


def _fit(tmp_path, model, steps, batch, ckpt_path=None):
    cb = NTKWeightingCallback(update_every_n_steps=2, estimator="fd", trace_averager=TraceAverager(0.8), seed=1)
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[cb], logger=False)
    trainer.fit(model, repeat_loader(batch, steps + 4), ckpt_path=ckpt_path)
    return trainer


def test_resume_is_exact_with_the_epsilon_schedule_mid_way(tmp_path):
    batch = heat_batch()
    schedule, advance_at = [0.01 * k for k in range(1, 30)], 0.97
    torch.manual_seed(0)
    init = Heat(schedule=schedule, advance_at=advance_at)
    a = copy.deepcopy(init)
    _fit(tmp_path / "a", a, 8, batch)
    b = copy.deepcopy(init)
    trainer = _fit(tmp_path / "b", b, 4, batch)
    stage_at_stop = b.causal["pde"].stage
    assert stage_at_stop > 0  # a fresh module would start the resumed steps at another ε
    trainer.save_checkpoint(tmp_path / "stop.ckpt")
    resumed = Heat(schedule=schedule, advance_at=advance_at)  # fresh: stage 0
    _fit(tmp_path / "b", resumed, 8, batch, ckpt_path=tmp_path / "stop.ckpt")
    assert resumed.causal["pde"].stage == a.causal["pde"].stage
    for (name, p), q in zip(a.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(resumed.ntk_weights, a.ntk_weights, rtol=0, atol=0)


def test_a_checkpoint_without_the_causal_state_is_refused(tmp_path):
    batch = heat_batch()
    trainer = _fit(tmp_path, Heat(causal=False), 1, batch)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="causal weighting for terms"):
        _fit(tmp_path, Heat(), 2, batch, ckpt_path=tmp_path / "plain.ckpt")


def test_tensorboard_gets_the_chunk_weights_the_smallest_weight_and_epsilon(tmp_path):
    torch.manual_seed(0)
    model, batch = Heat(), heat_batch()
    _, weights, _ = causal_by_hand(model, batch)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[NTKWeightingCallback(update_every_n_steps=1)])
    trainer.fit(model, repeat_loader(batch, 3))
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert events.Scalars("causal/min_weight/pde")[0].value == pytest.approx(min(weights), rel=1e-6)
    assert events.Scalars("causal/epsilon/pde")[0].value == EPS
    hist = events.Histograms("causal/weights/pde")[0]
    assert hist.step == 0
    assert list(hist.histogram_value.bucket) == pytest.approx(weights, rel=1e-12)  # one bucket per chunk
    assert list(hist.histogram_value.bucket_limit) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert "ntk/weight/pde" in events.Tags()["scalars"]


def test_misconfigured_causal_terms_fail_early(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown term\(s\) \['res'\] in `causal`; declared terms: \['ic', 'pde'\]"):
        PINNModule(terms=["ic", "pde"], causal={"res": CausalWeighting(time_column=1)})
    with pytest.raises(TypeError, match=r"`causal` must be a mapping \{term: CausalWeighting\}, got list"):
        PINNModule(terms=["ic", "pde"], causal=[CausalWeighting(time_column=1)])
    with pytest.raises(TypeError, match="CausalWeighting"):
        PINNModule(terms=["ic", "pde"], causal={"pde": {"time_column": 1}})
    shared = CausalWeighting(time_column=1)
    with pytest.raises(ValueError, match="its own"):
        PINNModule(terms=["ic", "pde"], causal={"ic": shared, "pde": shared})

    class NoPoints(Heat):
        residual_points = PINNModule.residual_points

    with pytest.raises(MisconfigurationException, match="residual_points"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[NTKWeightingCallback()], logger=False).fit(
            NoPoints(), repeat_loader(heat_batch(), 2)
        )
    with pytest.raises(NotImplementedError, match="residual_points"):  # without the callback: at the first step
        quiet_trainer(tmp_path, max_steps=1, logger=False).fit(NoPoints(), repeat_loader(heat_batch(), 2))


class RecordingLogger(pl.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    name = "recording"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class StepLosses(pl.Callback):
    """The losses and minimum causal weight of each step, computed before the step from the same batch."""

    def __init__(self):
        self.seen: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = module.step_losses(batch)
        total, losses, causal = step.total, step.losses, step.causal_weights
        seen = {tags.scalar(tags.LOSS, n): float(v.detach()) for n, v in losses.items()}
        seen[tags.scalar(tags.LOSS, "total")] = float(total.detach())
        seen[tags.scalar(tags.CAUSAL_MIN_WEIGHT, "pde")] = float(causal["pde"].min())
        seen[tags.scalar(tags.CAUSAL_EPSILON, "pde")] = module.causal["pde"].epsilon  # the ε of this step
        self.seen.append(seen)


@pytest.mark.parametrize("capture_step", [False, True])
def test_the_logger_gets_every_term_loss_at_its_cadence_and_only_the_total_is_logged_in_between(tmp_path, capture_step):
    # advance_at is low: ε moves on after every step, so a logged ε read after the move would be one ahead.
    model = Heat(schedule=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], advance_at=1e-12, capture_step=capture_step)
    calls: list[int] = []
    log = model.log

    def counting_log(*args, **kwargs):
        calls[-1] += 1
        return log(*args, **kwargs)

    model.log = counting_log

    class StepStart(pl.Callback):
        def on_train_batch_start(self, *args):
            calls.append(0)

    logger, seen = RecordingLogger(), StepLosses()
    batch = heat_batch()
    trainer = pl.Trainer(
        max_steps=6,
        log_every_n_steps=3,
        logger=logger,
        callbacks=[StepStart(), seen],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, torch.utils.data.DataLoader([batch] * 6, batch_size=None))
    steps = [step for step, _ in logger.records]
    assert steps == [2, 5]  # Lightning writes on steps 3 and 6 (0-based 2 and 5)
    for step, metrics in logger.records:
        want = seen.seen[step]
        for key, value in want.items():
            assert metrics[key] == pytest.approx(value, rel=1e-12), (step, key)
    assert calls == [1, 1, 5, 1, 1, 5]  # the total; at the cadence also 2 term losses, min weight and ε
    assert trainer.progress_bar_metrics == {}  # no progress bar: no per-step host read of the total


@pytest.mark.parametrize("capture_step", [False, True])
def test_a_causal_training_step_reads_nothing_on_the_host_between_logger_writes(tmp_path, capture_step):
    class HeatSGD(Heat):  # CPU Adam reads its step count on the host (on CUDA it is made capturable)
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    # ε must still move: the schedule advances on the device (advance_at is low enough to move at once).
    model = HeatSGD(schedule=[0.5, 1.0, 2.0], advance_at=0.01, capture_step=capture_step)
    syncs: list[int] = []
    step = model.training_step

    def counted_step(*args, **kwargs):
        with OpCounter() as ops:
            out = step(*args, **kwargs)
        syncs.append(ops.syncs)
        return out

    model.training_step = counted_step
    trainer = pl.Trainer(
        max_steps=6,
        log_every_n_steps=3,
        logger=RecordingLogger(),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, torch.utils.data.DataLoader([heat_batch()] * 6, batch_size=None))
    # Step 0 reads the times once (CausalWeighting's check of t_range); then nothing.
    assert [s for i, s in enumerate(syncs) if i % 3 != 2][1:] == [0, 0, 0]
    assert model.causal["pde"].stage == 2  # moved twice, then held at the last ε
    assert model.causal["pde"].epsilon_like(torch.zeros((), dtype=torch.float64)).item() == 2.0


def test_the_default_rule_is_per_point_only_for_the_traces_of_causal_modules(tmp_path):
    # The default decided in issue 29 (docs/results.md, "Which weight rule"). Gradient-norm weighting
    # keeps λ_i = Σ_j g_j / g_i, which the per-point rule would distort.
    for estimator, causal, mode in (
        ("exact", False, "trace"),
        ("exact", True, "mean_trace"),
        ("fd", True, "mean_trace"),
        ("grad_norm", True, "trace"),
    ):
        cb = NTKWeightingCallback(estimator=estimator)
        assert cb.weight_rule.mode == "trace"
        cb.setup(None, Heat(causal=causal), "fit")
        assert cb.weight_rule.mode == mode, (estimator, causal)
    explicit = WeightRule(mode="trace", ema=0.5)
    cb = NTKWeightingCallback(weight_rule=explicit)
    cb.setup(None, Heat(), "fit")
    assert cb.weight_rule is explicit
    # The weights a causal module trains with by default, by hand: λ_i = mean_j(T_j / N_j) / (T_i / N_i)
    # with 4 initial and 10 PDE points.
    cb = NTKWeightingCallback(update_every_n_steps=1)
    quiet_trainer(tmp_path, max_steps=1, callbacks=[cb], logger=False).fit(Heat(), repeat_loader(heat_batch(), 2))
    per_point = {"ic": cb.last_traces["ic"] / 4, "pde": cb.last_traces["pde"] / 10}
    mean = sum(per_point.values()) / 2
    assert cb.last_weights == pytest.approx({k: mean / v for k, v in per_point.items()}, rel=1e-10)

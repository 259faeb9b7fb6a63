"""AdaptiveCollocation: the points it draws, the scores and densities against hand computations, the
importance weights in traces and loss, resume, DDP, TensorBoard, and every bad input."""

import copy
import json
import math

import lightning.pytorch as pl
import pytest
import torch
from conftest import quiet_trainer, reference_point_norms
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_collocation import Heat, causal_scales_by_hand

from lightning_ntk import AdaptiveCollocation, NTKWeightingCallback, TraceAverager

N_PDE, N_IC = 8, 4


def unit_square(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, 2, generator=g, dtype=torch.float64)


def heat_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ic = torch.stack([torch.rand(N_IC, generator=g, dtype=torch.float64), torch.zeros(N_IC, dtype=torch.float64)], 1)
    return {"ic": ic, "pde": torch.rand(N_PDE, 2, generator=g, dtype=torch.float64)}


class Fresh(torch.utils.data.IterableDataset):
    """A fresh batch object every step (the adaptive callback overwrites the pde points in place)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __iter__(self):
        for step in range(self.steps):
            yield heat_batch(step)


def loader(steps: int):
    return torch.utils.data.DataLoader(Fresh(steps), batch_size=None)


class HeatAdam(Heat):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Recorder(pl.Callback):
    """What the step trained on: the batch's points and the module's point weights, after the draw."""

    def __init__(self) -> None:
        self.points, self.weights, self.params, self.buffers = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.points.append(batch["pde"].clone())
        self.weights.append({k: v.clone() for k, v in pl_module.point_weights.items()})
        self.buffers.append({k: v.data_ptr() for k, v in pl_module.point_weights.items()})
        self.params.append(copy.deepcopy(pl_module))


def fit(tmp_path, model, callbacks, steps, ckpt_path=None, **kwargs):
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=callbacks, **kwargs)
    trainer.fit(model, loader(steps + 2), ckpt_path=ckpt_path)
    return trainer


def pool_scores_by_hand(model, pool, score):
    """``q`` of every point of ``pool`` with the module's parameters, from scratch."""
    batch = {"ic": heat_batch()["ic"], "pde": pool}
    with torch.enable_grad():
        r = model.residuals(batch)["pde"].detach()
    s = causal_scales_by_hand(r, pool[:, 1]) if model.causal else torch.ones_like(r)
    q = s.sqrt() * r.abs()
    if score == "ntk":
        q = q * (s * reference_point_norms(model, batch)["pde"]).sqrt()
    return q


def pool_density_by_hand(model, pool, score, a=1.0, c=1.0):
    """The density of the scores of ``pool`` with the module's parameters, from scratch."""
    powered = pool_scores_by_hand(model, pool, score) ** a
    raw = powered / powered.mean() + c
    return raw / raw.sum()


@pytest.mark.parametrize("score", ["rad", "ntk"])
@pytest.mark.parametrize("causal", [True, False])
def test_density_is_the_score_of_the_pool_at_the_scoring_step(tmp_path, score, causal):
    torch.manual_seed(0)
    model, recorder = HeatAdam(causal=causal), Recorder()
    cb = AdaptiveCollocation({"pde": unit_square}, score=score, every_n_steps=2, pool_factor=3, a=1.5, c=0.5)
    fit(tmp_path, model, [cb, recorder], 3)
    # Scored at step 2 with the parameters of that step's start.
    at_scoring = recorder.params[2]
    assert cb.pools["pde"].shape == (3 * N_PDE, 2)
    want = pool_density_by_hand(at_scoring, cb.pools["pde"], score, a=1.5, c=0.5)
    torch.testing.assert_close(cb.densities["pde"], want, rtol=1e-9, atol=0)


def test_points_are_drawn_from_the_pool_with_their_importance_weights(tmp_path):
    torch.manual_seed(0)
    model, recorder = HeatAdam(), Recorder()
    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", every_n_steps=10, pool_factor=4)
    fit(tmp_path, model, [cb, recorder], 3)
    pool, density = cb.pools["pde"], cb.densities["pde"]
    for points, weights in zip(recorder.points, recorder.weights, strict=True):
        index = (points[:, None, :] == pool[None]).all(-1).int().argmax(1)
        torch.testing.assert_close(pool[index], points, rtol=0, atol=0)
        torch.testing.assert_close(weights["pde"], 1 / (pool.shape[0] * density[index]), rtol=1e-12, atol=0)
    # Kept in one buffer per term, written in place each step (what a captured replay reads).
    assert {ptrs["pde"] for ptrs in recorder.buffers} == {model.point_weights["pde"].data_ptr()}
    assert not torch.equal(recorder.weights[0]["pde"], recorder.weights[1]["pde"])


def test_uniform_score_leaves_the_data_modules_points(tmp_path):
    model, recorder = HeatAdam(), Recorder()
    fit(tmp_path, model, [AdaptiveCollocation({"pde": unit_square}, score="uniform"), recorder], 2)
    torch.testing.assert_close(recorder.points[1], heat_batch(1)["pde"], rtol=0, atol=0)
    assert recorder.weights[1] == {}


@pytest.mark.parametrize("importance", ["traces", "loss", "none"])
def test_importance_weights_enter_the_traces_and_the_loss_as_asked(tmp_path, importance):
    torch.manual_seed(0)
    model, recorder = HeatAdam(causal=False), Recorder()
    ntk = NTKWeightingCallback(update_every_n_steps=1)
    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", pool_factor=4, importance=importance)
    losses = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(outputs["loss"]), pl_module.ntk_weights.double().clone()))

    fit(tmp_path, model, [cb, recorder, ntk, Losses()], 2)
    at_step = recorder.params[1]
    batch = {"ic": heat_batch(1)["ic"], "pde": recorder.points[1]}
    k = reference_point_norms(at_step, batch)["pde"]
    omega = recorder.weights[1].get("pde", torch.ones(N_PDE, dtype=torch.float64))
    trace = (omega * k).sum() if importance != "none" else k.sum()
    assert ntk.last_traces["pde"] == pytest.approx(float(trace), rel=1e-10)
    with torch.enable_grad():
        r = at_step.residuals(batch)
    pde = (omega * r["pde"].detach() ** 2).mean() if importance == "loss" else (r["pde"].detach() ** 2).mean()
    loss, lam = losses[1]  # the weights the step used (set after the recorder copied the module)
    want = lam[0] * (r["ic"].detach() ** 2).mean() + lam[1] * pde
    assert loss == pytest.approx(float(want), rel=1e-12)


def test_causal_loss_with_weights_in_it_uses_self_normalised_chunk_losses(tmp_path):
    torch.manual_seed(0)
    model, recorder = HeatAdam(), Recorder()
    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", pool_factor=4, importance="loss")
    fit(tmp_path, model, [cb, recorder], 2)
    at_step, omega = recorder.params[1], recorder.weights[1]["pde"]
    batch = {"ic": heat_batch(1)["ic"], "pde": recorder.points[1]}
    at_step.set_point_weights({"pde": omega})
    losses = at_step.step_losses(batch).losses
    with torch.enable_grad():
        r = at_step.residuals(batch)["pde"].detach()
    s = causal_scales_by_hand(r, batch["pde"][:, 1], omega)
    torch.testing.assert_close(losses["pde"].detach(), (s * r**2).mean(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("stop", [3, 4])  # 3: the resumed step scores; 4: between scorings
def test_resume_equals_uninterrupted_with_per_step_fd_weights(tmp_path, stop):
    torch.manual_seed(0)
    init = HeatAdam()

    def callbacks():
        return [
            AdaptiveCollocation({"pde": unit_square}, score="rad", every_n_steps=3, pool_factor=4, seed=7),
            NTKWeightingCallback(
                1, estimator="fd", trace_averager=TraceAverager(), seed=3
            ),  # per-step fd at its defaults
        ]

    a = copy.deepcopy(init)
    a_cbs = callbacks()
    fit(tmp_path / "a", a, a_cbs, 8, logger=False)
    b = copy.deepcopy(init)
    trainer = fit(tmp_path / "b", b, callbacks(), stop, logger=False)
    trainer.save_checkpoint(tmp_path / "stop.ckpt")

    class Skip(torch.utils.data.IterableDataset):  # the data the interrupted run had not yet used
        def __iter__(self):
            for step in range(stop, 10):
                yield heat_batch(step)

    resumed, r_cbs = HeatAdam(), callbacks()
    trainer = quiet_trainer(tmp_path / "b", max_steps=8, callbacks=r_cbs, logger=False)
    trainer.fit(resumed, torch.utils.data.DataLoader(Skip(), batch_size=None), ckpt_path=tmp_path / "stop.ckpt")
    for p, q in zip(a.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    torch.testing.assert_close(resumed.ntk_weights, a.ntk_weights, rtol=0, atol=0)
    torch.testing.assert_close(r_cbs[0].densities["pde"], a_cbs[0].densities["pde"], rtol=0, atol=0)
    assert r_cbs[0].generator.get_state().equal(a_cbs[0].generator.get_state())


def test_tensorboard_gets_score_statistics_the_diagonal_and_the_density_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = HeatAdam()
    cb = AdaptiveCollocation({"pde": unit_square}, score="ntk", every_n_steps=2, pool_factor=4)
    trainer = fit(tmp_path, model, [cb], 3)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert "ntk/diag/pde" in tags["histograms"]
    assert "collocation/density/pde" in tags["images"]
    assert {"collocation/score_max_over_mean/pde", "collocation/effective_share/pde"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("collocation/effective_share/pde")] == [0, 2]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samplers": {"pde": None}}, "Term 'pde' has no sampler"),
        ({"samplers": {}}, "non-empty mapping"),
        ({"score": "residual"}, "`score` must be one of"),
        ({"importance": "both"}, "`importance` must be one of"),
        ({"pool_factor": 0}, "at least the batch's points"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"chunk_size": True}, "`chunk_size` must be a positive int"),
        ({"a": -1.0}, "`a` must be"),
        ({"c": math.inf}, "`c` must be"),
        ({"points": {"ic": lambda b: b["ic"]}}, "without a sampler"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    args = {"samplers": {"pde": unit_square}, **kwargs}
    with pytest.raises(MisconfigurationException, match=match):
        AdaptiveCollocation(**args)


@pytest.mark.parametrize(
    ("sampler", "match"),
    [
        (lambda g, n: torch.rand(n, 3, generator=g, dtype=torch.float64), r"returned shape \(32, 3\)"),
        (lambda g, n: torch.rand(n // 8, 2, generator=g, dtype=torch.float64), "at least as large as the batch"),
        (lambda g, n: torch.rand(n, 2, generator=g), "returned torch.float32"),
        (lambda g, n: torch.empty(n, 2, dtype=torch.float64, device="meta"), "returned them on meta"),
        (lambda g, n: [[0.0, 0.0]] * n, "it returned list"),
    ],
)
def test_a_bad_sampler_is_named_at_the_first_step(tmp_path, sampler, match):
    cb = AdaptiveCollocation({"pde": sampler}, score="rad", pool_factor=4)
    with pytest.raises((ValueError, TypeError), match=match) as err:
        fit(tmp_path, HeatAdam(), [cb], 1)
    assert "'pde'" in str(err.value)


def test_non_finite_scores_stop_at_the_scoring_step_naming_the_term(tmp_path):
    class Blows(HeatAdam):
        def residuals(self, batch):
            out = super().residuals(batch)
            return {**out, "pde": out["pde"] / (batch["pde"][:, 0] > 0.5)}  # inf where x ≤ 0.5

    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", pool_factor=4)
    with pytest.raises(ValueError, match=r"scores of term 'pde' are not finite at step 0"):
        fit(tmp_path, Blows(causal=False), [cb], 1)


def test_unknown_terms_and_the_wrong_callback_order_fail_at_setup(tmp_path):
    with pytest.raises(MisconfigurationException, match=r"samplers for \['res'\]"):
        fit(tmp_path, HeatAdam(), [AdaptiveCollocation({"res": unit_square})], 1)
    cbs = [NTKWeightingCallback(1), AdaptiveCollocation({"pde": unit_square})]
    with pytest.raises(MisconfigurationException, match="before NTKWeightingCallback"):
        fit(tmp_path, HeatAdam(), cbs, 1)


def test_points_that_are_not_a_tensor_of_the_batch_are_refused(tmp_path):
    cb = AdaptiveCollocation({"pde": unit_square}, points={"pde": lambda b: b["pde"][:, :]})
    with pytest.raises(ValueError, match="one tensor of the batch itself"):
        fit(tmp_path, HeatAdam(), [cb], 1)


# ---------------------------------------------------------------- DDP


class RankDraws(pl.Callback):
    def __init__(self, root: str, adaptive: AdaptiveCollocation) -> None:
        self.root, self.adaptive = root, adaptive

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pool = self.adaptive.pools["pde"]
        inside = bool((batch["pde"][:, None, :] == pool[None]).all(-1).any(1).all())
        record = {
            "rank": trainer.global_rank,
            "step": trainer.global_step,
            "inside": inside,
            "pool": pool.tolist(),
            "density": self.adaptive.densities["pde"].tolist(),
        }
        with open(f"{self.root}/rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.mark.slow  # spawns two processes; CI runs it
def test_ddp_ranks_draw_their_own_share_from_their_own_pools(tmp_path):
    torch.manual_seed(0)
    model = HeatAdam()
    init = copy.deepcopy(model)
    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", every_n_steps=2, pool_factor=4, seed=11)
    trainer = quiet_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
        callbacks=[cb, RankDraws(str(tmp_path), cb)],
        logger=False,
        use_distributed_sampler=False,
    )
    trainer.fit(model, loader(5))
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    for r, records in enumerate(ranks):
        assert [rec["step"] for rec in records] == [0, 1, 2]
        assert all(rec["inside"] for rec in records)
        # Each rank's pool comes from its own generator, seed + rank.
        want = unit_square(torch.Generator().manual_seed(11 + r), 4 * N_PDE)
        torch.testing.assert_close(torch.tensor(records[0]["pool"], dtype=torch.float64), want, rtol=0, atol=0)
    assert ranks[0][0]["pool"] != ranks[1][0]["pool"]
    # One sum over ranks: each rank's density uses the mean score of both pools.
    pools = [torch.tensor(records[0]["pool"], dtype=torch.float64) for records in ranks]
    scores = [pool_scores_by_hand(init, pool, "rad") for pool in pools]
    mean = torch.cat(scores).mean()
    for records, q in zip(ranks, scores, strict=True):
        raw = q / mean + 1.0
        got = torch.tensor(records[0]["density"], dtype=torch.float64)
        torch.testing.assert_close(got, raw / raw.sum(), rtol=1e-9, atol=0)


def test_the_density_image_puts_x_to_the_right_and_t_upward(tmp_path):
    import io
    from types import SimpleNamespace

    import numpy as np
    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_ntk.tensorboard import add_density_image

    logger = TensorBoardLogger(tmp_path, name="img")
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger])
    points = torch.tensor([[0.9, 0.95], [0.0, 0.0], [1.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    density = torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64)  # nearly all at large x, large t
    assert add_density_image(trainer, "collocation/density/pde", points, density, step=3, bins=4)
    logger.experiment.flush()
    (image,) = EventAccumulator(logger.log_dir, size_guidance={"images": 0}).Reload().Images("collocation/density/pde")
    pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L"), dtype=float)
    assert image.step == 3 and pixels.shape == (4, 4)
    assert pixels[0, 3] == pixels.max() == 255  # top right: x large (right), t large (up)
    assert pixels[3, 0] == pytest.approx(255 * (0.01 / 0.97) ** 0.5, abs=1.5)  # bottom left, √-scaled


def test_the_users_own_points_are_put_back_after_every_step(tmp_path):
    """A list-backed loader yields the user's own tensors every step: the draw lends their storage to one step."""
    torch.manual_seed(0)
    mine = heat_batch(0)
    original = mine["pde"].clone()
    recorder = Recorder()
    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", pool_factor=4, seed=1)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[cb, recorder])
    trainer.fit(HeatAdam(), torch.utils.data.DataLoader([mine] * 5, batch_size=None))
    assert torch.equal(mine["pde"], original)
    assert all(not torch.equal(points, original) for points in recorder.points)  # the steps trained on drawn points


def test_seed_everything_reaches_the_default_generator(tmp_path):
    pools = []
    for seed in (5, 5, 6):
        pl.seed_everything(seed, verbose=False)
        cb = AdaptiveCollocation({"pde": unit_square}, score="rad", pool_factor=4)
        fit(tmp_path / str(len(pools)), HeatAdam(), [cb], 1)
        pools.append(cb.pools["pde"])
    assert torch.equal(pools[0], pools[1]) and not torch.equal(pools[0], pools[2])


def test_seed_must_be_an_int_or_none():
    with pytest.raises(MisconfigurationException, match="`seed` must be an int or None"):
        AdaptiveCollocation({"pde": unit_square}, seed=1.5)


def test_tuning_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        AdaptiveCollocation({"pde": unit_square}, "rad", 10)


def test_a_tuple_batch_without_points_says_what_points_must_return(tmp_path):
    class TupleHeat(HeatAdam):
        def residuals(self, batch):
            return super().residuals({"ic": batch[0], "pde": batch[1]})

        def residual_points(self, batch):
            return {"pde": batch[1]}

    batch = heat_batch(0)
    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", pool_factor=4, seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[cb])
    with pytest.raises(ValueError, match=r"batch is a list, not a mapping .* `points=\{'pde': lambda batch: \.\.\.\}`"):
        trainer.fit(TupleHeat(), torch.utils.data.DataLoader([[batch["ic"], batch["pde"]]] * 2, batch_size=None))


def test_one_collective_per_scoring_serves_every_term(tmp_path, monkeypatch):
    def initial_line(g, n):
        return torch.stack([torch.rand(n, generator=g, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)], 1)

    calls = []
    cb = AdaptiveCollocation({"ic": initial_line, "pde": unit_square}, score="rad", every_n_steps=2, pool_factor=4)
    trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[cb])
    reduce = type(trainer.strategy).reduce

    def counted(self, tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return reduce(self, tensor, *args, **kwargs)

    monkeypatch.setattr(type(trainer.strategy), "reduce", counted)
    trainer.fit(HeatAdam(), loader(5))
    assert calls == [(2, 2), (2, 2)]  # steps 0 and 2: both terms' sums in one reduction


def test_a_sampler_beyond_the_batchs_domain_is_named_once(tmp_path):
    def too_wide(g, n):  # [-0.5, 1.5]² for points of the unit square
        return torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 0.5

    cb = AdaptiveCollocation({"pde": too_wide}, score="rad", every_n_steps=1, pool_factor=4, seed=0)
    with pytest.warns(UserWarning, match=r"sampler of term 'pde' returns points .* coordinate\(s\) \[0, 1\]") as seen:
        fit(tmp_path, HeatAdam(), [cb], 3)
    assert sum("sampler of term" in str(w.message) for w in seen) == 1


def test_a_sampler_of_the_batchs_domain_is_not_warned_about(tmp_path, recwarn):
    cb = AdaptiveCollocation({"pde": unit_square}, score="rad", pool_factor=4, seed=0)
    fit(tmp_path, HeatAdam(), [cb], 2)
    assert not [w for w in recwarn if "sampler of term" in str(w.message)]


def _same_size_batches(steps: int):
    """Batches whose initial-condition points are as many as the PDE points (a wrong `points` passes every shape
    check)."""
    batches = []
    for step in range(steps):
        batch = heat_batch(step)
        batch["ic"] = torch.cat([batch["ic"], batch["ic"]])
        assert batch["ic"].shape == batch["pde"].shape
        batches.append(batch)
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_points_aimed_at_another_terms_tensor_of_the_same_size_are_refused(tmp_path):
    cb = AdaptiveCollocation({"pde": unit_square}, points={"pde": lambda b: b["ic"]}, pool_factor=2, seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[cb])
    with pytest.raises(ValueError, match=r"term 'pde''s residual stays finite when every point of that tensor is NaN"):
        trainer.fit(HeatAdam(), _same_size_batches(3))


def test_the_right_tensor_given_through_points_trains(tmp_path):
    model = HeatAdam()
    cb = AdaptiveCollocation({"pde": unit_square}, points={"pde": lambda b: b["pde"]}, pool_factor=2, seed=0)
    trainer = quiet_trainer(tmp_path, max_steps=2, callbacks=[cb])
    trainer.fit(model, _same_size_batches(3))
    assert trainer.global_step == 2


def test_a_residual_with_other_rows_than_the_points_is_refused(tmp_path):
    class Doubled(HeatAdam):
        def residuals(self, batch):
            out = dict(super().residuals(batch))
            out["pde"] = torch.cat([out["pde"], out["pde"]])
            return out

    cb = AdaptiveCollocation({"pde": unit_square}, pool_factor=2, seed=0)
    with pytest.raises(ValueError, match=r"term 'pde''s residual has 16 rows for the tensor's 8 points"):
        fit(tmp_path, Doubled(), [cb], 1)


def test_the_points_probe_runs_once_per_term_and_fit(tmp_path, monkeypatch):
    import lightning_ntk.adaptive_collocation as module

    probed = []
    original = module.check_points_are_read
    monkeypatch.setattr(module, "check_points_are_read", lambda *a: probed.append(a[2]) or original(*a))
    cb = AdaptiveCollocation({"pde": unit_square}, every_n_steps=1, pool_factor=2, seed=0)
    model = HeatAdam()
    fit(tmp_path, model, [cb], 3)
    assert probed == ["pde"]
    fit(tmp_path, model, [cb], 2)
    assert probed == ["pde", "pde"]


def test_the_points_probe_is_not_mistaken_for_an_anomaly(tmp_path):
    # Trainer(detect_anomaly=True) raises on NaN in any backward; the probe's NaN points are deliberate.
    cb = AdaptiveCollocation({"pde": unit_square}, pool_factor=2, seed=0)
    trainer = fit(tmp_path, HeatAdam(), [cb], 2, detect_anomaly=True)
    assert trainer.global_step == 2

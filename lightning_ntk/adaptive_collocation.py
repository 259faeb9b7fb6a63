"""``AdaptiveCollocation``: draw a term's collocation points from residual or NTK scores during training."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_ntk import tags
from lightning_ntk.callback import NTKWeightingCallback
from lightning_ntk.checks import non_negative_number, optional_seed, positive_int
from lightning_ntk.collocation import draw, point_residual_norms, scored_density
from lightning_ntk.collocation_points import (
    check_points_are_read,
    check_pool,
    domain_excess,
    parameters_frozen,
    term_points,
    with_points,
)
from lightning_ntk.contract import check_residuals
from lightning_ntk.generators import CallbackGenerator
from lightning_ntk.jacobian import per_point_squared_norms
from lightning_ntk.module import PINNModule, require_pinn_module
from lightning_ntk.ntk_view import point_scales, scale_rows
from lightning_ntk.tensorboard import add_density_image, add_histogram, log_metrics

__all__ = ["AdaptiveCollocation"]

Score = Literal["uniform", "rad", "ntk"]
Importance = Literal["none", "traces", "loss"]
SCORES: tuple[str, ...] = get_args(Score)
IMPORTANCE: tuple[str, ...] = get_args(Importance)
Sampler = Callable[[torch.Generator, int], Tensor]


class AdaptiveCollocation(Callback):
    r"""Draws some terms' collocation points from scores of a candidate pool, every step.

    Every ``every_n_steps`` steps it draws a pool of ``pool_factor ×`` the batch's points of each term from
    that term's ``sampler`` (uniform candidates), scores the pool at the current parameters (in chunks
    of ``chunk_size``), and turns the scores into a density ``p_n ∝ q_n^a / mean(q^a) + c``
    (:func:`~lightning_ntk.collocation.scored_density`). At every step the term's points in the batch are
    replaced, in place, by ``N`` pool points drawn from ``p`` with replacement. Scores ``q``:

    - ``"uniform"``: leave the term's points as the data module drew them (today's behaviour).
    - ``"rad"``: ``|r̃_n|``, the residual norm (RAD, Wu et al. 2023).
    - ``"ntk"``: ``|r̃_n| · √K̃_nn``, the residual times the square root of the point's NTK diagonal: the
      norm of the point's loss gradient, the density of least gradient variance, and in NTK terms the
      rate ``K_nn r_n²`` at which the next steps can lower that point's loss
      (:mod:`lightning_ntk.collocation`). Costs an exact NTK diagonal of the pool per scoring.

    For a causal term ``r̃ = √s r`` and ``K̃ = s K`` with the causal scales of the pool
    (:mod:`lightning_ntk.causal`): time chunks whose causal weight is still ≈ 0 get only the uniform share.

    **Importance weights.** Points drawn from ``p`` carry ``ω_n = 1/(P p_n)``
    (:meth:`~lightning_ntk.PINNModule.set_point_weights`). ``importance="loss"`` (default) puts them in
    the loss and the NTK traces: the loss, the causal chunk losses and the traces the weight rule balances
    stay unbiased estimates of their uniform-measure values, and the points only lower their variance.
    ``"traces"`` puts them in the traces only (the loss focuses on the drawn points, as RAD does; without
    weights there, concentrating points where ``K_nn`` is large inflates ``Tr K / N`` and every other
    term's weight); ``"none"`` in neither. On Burgers, focusing the loss was the worse choice for both
    scores (``docs/results.md``, adaptive collocation).

    **Distributed.** Each rank draws its own pool from a generator seeded ``seed + global_rank`` and draws
    its own points from it; one collective per scoring (a sum, for all terms at once) makes ``mean(q^a)``
    the mean over every rank's pool, so ``c`` means the same on every rank. The global batch is then the
    union of the ranks' draws: rank ``k``'s share follows ``p`` restricted to pool ``k``, normalised over pool ``k``.

    Put it before :class:`~lightning_ntk.NTKWeightingCallback` in ``callbacks``: the weights must be
    measured on the points the step trains on.

    Args:
        samplers: ``{term: sampler}``; ``sampler(generator, n)`` returns ``(n, d)`` uniform candidates of
            the term's domain, of the batch points' dtype, on the CPU or their device.
        score: ``"rad"``, ``"ntk"`` or ``"uniform"``.
        every_n_steps: Steps between scorings (step 0 included).
        pool_factor: Pool size as a multiple of the term's points per batch (≥ 1).
        a: Sharpness of the density (RAD's ``k``).
        c: Uniform share ``c / (1 + c)`` of the density.
        importance: ``"loss"``, ``"traces"`` or ``"none"`` (see above).
        points: ``{term: fn(batch) -> Tensor}``: the tensor of the batch that holds the term's points
            (default ``batch[term]``); it is overwritten in place.
        chunk_size: Pool points scored at a time.
        seed: Seeds the pools and draws (plus the global rank); ``None`` (default): drawn from torch's global
            generator at ``setup``, so ``lightning.seed_everything`` reaches it.

    Example::

        from lightning_ntk import AdaptiveCollocation, NTKWeightingCallback

        def interior(g, n):  # uniform (x, t) in [-1, 1] x [0, 1]
            return torch.rand(n, 2, generator=g) * torch.tensor([2.0, 1.0]) - torch.tensor([1.0, 0.0])

        trainer = pl.Trainer(callbacks=[AdaptiveCollocation({"pde": interior}, score="rad"),
                                        NTKWeightingCallback(update_every_n_steps=100)])
    """

    def __init__(
        self,
        samplers: Mapping[str, Sampler],
        score: Score = "rad",
        *,
        every_n_steps: int = 100,
        pool_factor: int = 8,
        a: float = 1.0,
        c: float = 1.0,
        importance: Importance = "loss",
        points: Mapping[str, Callable[[Any], Tensor]] | None = None,
        chunk_size: int = 2048,
        seed: int | None = None,
    ) -> None:
        _check_arguments(samplers, score, every_n_steps, pool_factor, a, c, importance, points, chunk_size, seed)
        self.samplers = dict(samplers)
        self.score = score
        self.every_n_steps = every_n_steps
        self.pool_factor = pool_factor
        self.a, self.c = float(a), float(c)
        self.importance = importance
        self.points = dict(points or {})
        self.chunk_size = chunk_size
        self.rng = CallbackGenerator(seed)
        # (the batch's tensor, its values before the draw) per term: put back after the step, so the user's own
        # tensors (a list-backed loader yields the same ones every step) are never lost.
        self._lent: list[tuple[Tensor, Tensor]] = []
        self._domain_checked: set[str] = set()  # terms whose sampler's domain was compared with the batch's
        self._read_checked: set[str] = set()  # terms whose `points` tensor was probed against their residual
        self.pools: dict[str, Tensor] = {}
        self.densities: dict[str, Tensor] = {}
        self._last_scored: int | None = None  # the step whose pool was scored last (resumes skip it)

    def should_score(self, step: int) -> bool:
        """Whether to score a fresh pool before step ``step``: every ``every_n_steps`` steps, step 0 included."""
        return step % self.every_n_steps == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the module's terms and the callbacks' order; seeds this rank's generator."""
        require_pinn_module(pl_module, type(self).__name__)
        assert isinstance(pl_module, PINNModule)
        unknown = [name for name in self.samplers if name not in pl_module.terms]
        if unknown:
            raise MisconfigurationException(
                f"AdaptiveCollocation has samplers for {unknown}, which {type(pl_module).__name__} does not declare; "
                f"declared terms: {list(pl_module.terms)}."
            )
        weighting = [i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, NTKWeightingCallback)]
        if weighting and weighting[0] < trainer.callbacks.index(self):
            raise MisconfigurationException(
                "Put AdaptiveCollocation before NTKWeightingCallback in `callbacks`: the weights must be measured "
                "on the points the step trains on."
            )
        if self.rng.generator is None:
            self.rng.start(torch.device("cpu"), trainer.global_rank)

    @property
    def generator(self) -> torch.Generator | None:
        """The CPU generator of pools and draws: ``seed + global_rank``, or with ``seed=None`` drawn from torch's
        global generator at ``setup`` (so ``seed_everything`` reaches it); checkpointed."""
        return self.rng.generator

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Moves restored pools to the module's device; each term's points are probed again in this fit."""
        self.pools = {name: pool.to(pl_module.device) for name, pool in self.pools.items()}
        self._read_checked.clear()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Scores a fresh pool when due, then draws this step's points of every term into the batch."""
        if self.score == "uniform":
            return
        assert isinstance(pl_module, PINNModule) and self.generator is not None
        step = trainer.global_step
        if (self.should_score(step) and step != self._last_scored) or not self.densities:
            self.score_pools(trainer, pl_module, batch)
            self._last_scored = step
        omegas = {}
        for name in self.samplers:
            target = self._target(pl_module, name, batch)
            indices, omegas[name] = draw(self.densities[name], target.shape[0], self.generator)
            pool = self.pools[name]
            self._lent.append((target, target.clone()))
            target.copy_(pool[indices.to(pool.device)])
            omegas[name] = omegas[name].to(target)
        if self.importance != "none":
            pl_module.set_point_weights(omegas, in_loss=self.importance == "loss")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Puts the batch's own points back: the draw lent their storage to this step only."""
        for target, values in self._lent:
            target.copy_(values)
        self._lent.clear()

    def score_pools(self, trainer: pl.Trainer, pl_module: PINNModule, batch: Any) -> None:
        """Draw a pool for every term, score it, and keep its density; log what was scored. Under DDP one
        collective (a sum over ranks of every term's ``Σ q^a`` and pool size) serves all terms."""
        assert self.generator is not None
        scored = {}
        for name, sampler in self.samplers.items():
            target = self._target(pl_module, name, batch)
            pool = self._checked_pool(name, sampler, target)
            q, diagonal = self._pool_scores(pl_module, batch, name, target, pool)
            scored[name] = (pool, q, q.pow(self.a), diagonal)
        sums = torch.stack([torch.stack([p.sum(), p.new_tensor(p.numel())]) for _, _, p, _ in scored.values()])
        totals = trainer.strategy.reduce(sums, reduce_op="sum")
        for (name, (pool, q, powered, diagonal)), total in zip(scored.items(), totals, strict=True):
            density = scored_density(q, self.a, self.c, mean=total[0] / total[1])
            if not bool(torch.isfinite(density).all()):
                raise ValueError(
                    f"AdaptiveCollocation: the {self.score!r} scores of term {name!r} are not finite at step "
                    f"{trainer.global_step}: the residual (or its NTK diagonal) holds NaN/Inf on the pool. Check the "
                    "sampler's domain and the residual there."
                )
            self.pools[name], self.densities[name] = pool, density.cpu()
            self._log(trainer, name, pool, density, powered, diagonal)

    def _target(self, pl_module: PINNModule, name: str, batch: Any) -> Tensor:
        target = term_points(batch, name, self.points.get(name))
        if name not in self._read_checked:  # once per term and fit: one residual evaluation
            check_points_are_read(pl_module, batch, name, target)
            self._read_checked.add(name)
        return target

    def _checked_pool(self, name: str, sampler: Sampler, target: Tensor) -> Tensor:
        size = self.pool_factor * target.shape[0]
        pool = check_pool(name, sampler(self.generator, size), target, size)
        if name not in self._domain_checked:  # warn once per term
            self._domain_checked.add(name)
            excess = domain_excess(name, pool, target)
            if excess is not None:
                rank_zero_warn(excess)
        return pool

    def _pool_scores(
        self, pl_module: PINNModule, batch: Any, name: str, target: Tensor, pool: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """``(q, K̃)`` over the pool: residual norms and, for ``"ntk"``, the NTK diagonal (causally scaled)."""
        norms, diagonal = [], []
        # The residual score needs no graph through the parameters: only the input derivatives.
        frozen = parameters_frozen(pl_module) if self.score == "rad" else contextlib.nullcontext()
        with frozen:
            for chunk in pool.split(self.chunk_size):
                chunk_batch = with_points(batch, target, chunk.clone())
                with torch.enable_grad():
                    residuals = check_residuals(pl_module.residuals(chunk_batch), pl_module.terms, require_grad=False)
                    if self.score == "ntk":
                        k = per_point_squared_norms(pl_module, chunk_batch, reference=residuals).norms[name]
                        diagonal.append(k.detach())
                norms.append(point_residual_norms(residuals[name]))
                components = max(1, residuals[name][:1].numel())
        r = torch.cat(norms)
        k = torch.cat(diagonal) if diagonal else None
        cw = pl_module.causal.get(name)
        if cw is not None:
            # The pool's chunk losses (mean square over a point's components, as in training).
            chunks, weights = cw.weights(r / math.sqrt(components), pool)
            s = point_scales(chunks, weights).to(r)
            r = scale_rows(r, s)  # r̃ = √s r, K̃ = s K: the rows the training loss weighs
            k = None if k is None else k * s
        return (r if k is None else r * k.clamp_min(0).sqrt()), k

    def _log(
        self, trainer: pl.Trainer, name: str, pool: Tensor, density: Tensor, powered: Tensor, diagonal: Tensor | None
    ) -> None:
        step = trainer.global_step
        peak = powered.max() / powered.mean().clamp_min(torch.finfo(powered.dtype).tiny)
        share = 1.0 / (density.numel() * density.square().sum())  # effective sample size / pool size
        log_metrics(
            trainer,
            {
                tags.scalar(tags.COLLOCATION_SCORE_PEAK, name): float(peak),
                tags.scalar(tags.COLLOCATION_EFFECTIVE_SHARE, name): float(share),
            },
        )
        if diagonal is not None:
            add_histogram(trainer, tags.scalar(tags.NTK_DIAGONAL, name), diagonal, step)
        add_density_image(trainer, tags.scalar(tags.COLLOCATION_DENSITY, name), pool, density, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.rng.state_dict(),
            "pools": {name: pool.cpu() for name, pool in self.pools.items()},
            "densities": dict(self.densities),
            "last_scored": self._last_scored,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rng.load_state_dict(state_dict.get("generator"))
        self.pools = dict(state_dict.get("pools", {}))
        self.densities = dict(state_dict.get("densities", {}))
        self._last_scored = state_dict.get("last_scored")


def _check_arguments(
    samplers: object,
    score: object,
    every_n_steps: object,
    pool_factor: object,
    a: object,
    c: object,
    importance: object,
    points: object,
    chunk_size: object,
    seed: object,
) -> None:
    """A ``MisconfigurationException`` that says what to change, for the first bad argument."""
    error = MisconfigurationException
    if not isinstance(samplers, Mapping) or not samplers:
        raise error("`samplers` must be a non-empty mapping {term: sampler(generator, n) -> (n, d) points}.")
    for name, sampler in samplers.items():
        if not callable(sampler):
            raise error(
                f"Term {name!r} has no sampler (got {sampler!r}): give a function (generator, n) -> (n, d) "
                "uniform candidate points of the term's domain."
            )
    if score not in SCORES:
        raise error(f"`score` must be one of {SCORES}, got {score!r}.")
    if importance not in IMPORTANCE:
        raise error(f"`importance` must be one of {IMPORTANCE}, got {importance!r}.")
    positive_int("every_n_steps", every_n_steps, error)
    positive_int("pool_factor", pool_factor, error, hint=" (the pool must hold at least the batch's points)")
    positive_int("chunk_size", chunk_size, error)
    non_negative_number("a", a, error)
    non_negative_number("c", c, error)
    if score != "uniform" and c == 0 and a == 0:
        raise error("`a = 0` and `c = 0` leave no density; use score='uniform'.")
    optional_seed("seed", seed, error)
    unknown = sorted(set(points or {}) - set(samplers))
    if unknown:
        raise error(f"`points` names term(s) {unknown} without a sampler.")

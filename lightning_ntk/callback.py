"""``NTKWeightingCallback``: NTK trace weights for the loss terms of a ``PINNModule``."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_ntk.averaging import TraceAverager
from lightning_ntk.checks import callback_arguments
from lightning_ntk.estimators import TraceEstimate, TraceEstimator
from lightning_ntk.generators import CallbackGenerator
from lightning_ntk.measured import estimator_now
from lightning_ntk.module import PINNModule, require_pinn_module
from lightning_ntk.tensorboard import due, log_metrics, write_custom_scalars
from lightning_ntk.updates import UpdateRecord
from lightning_ntk.validity import DeferredValidityCheck
from lightning_ntk.weights import WeightRule, default_weight_rule

__all__ = ["NTKWeightingCallback"]


class NTKWeightingCallback(Callback):
    r"""Weights the loss terms of a :class:`~lightning_ntk.PINNModule` by their NTK block traces.

    At optimizer step 0 and then every ``update_every_n_steps`` optimizer steps, *before* the step's
    forward pass, it estimates ``Tr K_ii`` of every term on the training batch, sums traces and point
    counts over ranks (the traces of the global batch: every rank gets the same weights), optionally
    averages estimates over updates, turns them into weights with ``weight_rule`` and writes them into
    the module's ``ntk_weights``. Once per optimizer step under accumulation; validation never touches them.

    Its parts: the estimator, wrapped to measure :meth:`~lightning_ntk.PINNModule.ntk_view` (causal and
    importance-weighted terms) and replayed from CUDA graphs with ``capture``
    (:class:`~lightning_ntk.measured.CapturedEstimator`); a
    :class:`~lightning_ntk.validity.DeferredValidityCheck` that reads whether the values were finite and
    positive before the optimizer step without stalling the GPU; a
    :class:`~lightning_ntk.generators.CallbackGenerator`. Logs ``ntk/trace/<term>``,
    ``ntk/trace_stderr/<term>``, ``ntk/weight/<term>`` (or ``grad_norm/<term>`` with
    ``estimator="grad_norm"``, for comparison: not the NTK). Override :meth:`should_update` for another schedule.

    Example::

        ntk = NTKWeightingCallback(update_every_n_steps=100, weight_rule=WeightRule(ema=0.9))
        trainer = pl.Trainer(max_steps=10_000, callbacks=[ntk])
        trainer.fit(model, datamodule)   # model: a PINNModule
        ntk.last_weights                 # {'bc': 97.3, 'pde': 1.01}
        # Per-step weights: exact at the first update, then the finite-difference sketch, averaged.
        ntk = NTKWeightingCallback(update_every_n_steps=1, estimator="fd", trace_averager=TraceAverager(0.99))

    Args:
        update_every_n_steps: Recompute the weights every this many optimizer steps (step 0 included).
        estimator: A :class:`~lightning_ntk.estimators.TraceEstimator` or the name of one with its
            defaults: ``"exact"``, ``"subsample"``, ``"hutchinson"``, ``"hutchpp"``, ``"fd"``, ``"auto"``,
            or ``"grad_norm"``.
        weight_rule: Turns traces into weights. Default (chosen at ``setup``,
            :func:`~lightning_ntk.weights.default_weight_rule`): ``WeightRule()``, or
            ``WeightRule(mode="mean_trace")`` for NTK traces of a module with causal terms.
        trace_averager: Averages the estimates across updates before weighting (for sketches).
        monitor_only: Compute and log the weights, but never apply them.
        seed: Seeds the random generator (plus the global rank); ``None``: drawn at fit start.
        on_nonfinite: A NaN, infinite or zero value: ``"raise"`` an error naming the term and the step,
            or ``"skip"`` (warn, keep the previous weights).
        capture: Replay the ``exact`` and ``fd`` computations from a CUDA graph per batch signature (checked
            against an eager call first; eager where capture fails). On a CPU: eager, same buffers.
    """

    def __init__(
        self,
        update_every_n_steps: int = 100,
        estimator: str | TraceEstimator = "exact",
        weight_rule: WeightRule | None = None,
        trace_averager: TraceAverager | None = None,
        monitor_only: bool = False,
        seed: int | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        capture: bool = True,
    ) -> None:
        self.estimator = callback_arguments(
            every=update_every_n_steps,
            estimator=estimator,
            rule=weight_rule,
            averager=trace_averager,
            on_nonfinite=on_nonfinite,
            capture=capture,
            seed=seed,
            error=MisconfigurationException,
        )
        self.update_every_n_steps = update_every_n_steps
        # Without a rule given, the default depends on the module (causal terms or not): set in setup.
        self._default_rule = weight_rule is None
        self.weight_rule = weight_rule if weight_rule is not None else default_weight_rule()
        self.trace_averager = trace_averager
        self.monitor_only = monitor_only
        self.capture = capture
        self.rng = CallbackGenerator(seed)
        self.validity = DeferredValidityCheck(on_nonfinite)
        self.last_estimate: TraceEstimate | None = None
        # Optimizer step of the last update (-1: none): one update per accumulated step; resumes continue it.
        self._last_update_step = -1
        self._last_logged_step = -1
        self._monitored_weights: Tensor | None = None
        self._latest: UpdateRecord | None = None
        self._reported_paths = False
        self._estimators: dict[str, TraceEstimator] = {}  # "main" and the exact "start", wrapped

    def should_update(self, step: int) -> bool:
        """Whether to recompute the weights before optimizer step ``step`` (zero-based).

        The default is every ``update_every_n_steps`` steps, step 0 included.
        """
        return step % self.update_every_n_steps == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks that the module follows the :class:`~lightning_ntk.PINNModule` contract, and picks the
        default weight rule for it (``mean_trace`` if it has causal terms)."""
        require_pinn_module(pl_module, type(self).__name__)
        assert isinstance(pl_module, PINNModule)
        pl_module.add_before_optimizer_step(self, self.resolve_pending_check)  # a captured step calls it
        if self._default_rule:
            grad_norms = self.estimator.name == "grad_norm"
            self.weight_rule = default_weight_rule(grad_norms=grad_norms, causal=bool(pl_module.causal))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Creates the random generator on the module's device (known only now) and moves restored state there."""
        device = pl_module.device
        self.rng.start(device, trainer.global_rank)
        if isinstance(pl_module, PINNModule):
            write_custom_scalars(trainer, pl_module.terms, tuple(pl_module.causal))
        # Averages restored from a checkpoint live on the CPU until the module's device is known.
        if self.trace_averager is not None:
            self.trace_averager.to(device)
        if self._monitored_weights is not None:
            self._monitored_weights = self._monitored_weights.to(device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Recomputes the weights before the forward pass of an optimizer step that is due."""
        step = trainer.global_step
        if step == self._last_update_step or not self.should_update(step):
            return
        assert isinstance(pl_module, PINNModule)
        self.update_weights(trainer, pl_module, batch)
        self._last_update_step = step

    def update_weights(self, trainer: pl.Trainer, pl_module: PINNModule, batch: Any) -> Tensor:
        """Measure every term on ``batch``, combine over ranks, and set (or monitor) the weights.

        No device value is read on the host here: validity is decided on the device (the previous weights
        are kept where it fails) and read by :attr:`validity` before the optimizer step."""
        self.resolve_pending_check()
        names = pl_module.terms
        measure = estimator_now(self._estimators, self.estimator, self.trace_averager, self.capture)
        estimate = measure(pl_module, batch, self.rng.generator)
        values, rows, variances = estimate.reduce(names, lambda t, op: trainer.strategy.reduce(t, reduce_op=op))
        valid = (torch.isfinite(values) & (values > 0)).all()
        undo = self._undo_for(estimate)
        if self.trace_averager is None:
            stderr = variances.sqrt()
        else:
            values, stderr = self.trace_averager.update(values, variances)
        previous = pl_module.ntk_weights if not self.monitor_only else self._monitored_weights
        previous = torch.ones_like(values) if previous is None else previous.to(values)
        weights = torch.where(valid, self.weight_rule(values, rows, previous), previous)
        if self.monitor_only:
            self._monitored_weights = weights.detach().clone()
        else:
            pl_module.set_term_weights(weights.to(pl_module.ntk_weights))
        self.validity.arm(
            valid=valid,
            step=trainer.global_step,
            values=values,
            estimate=estimate,
            module=pl_module,
            batch=batch,
            undo=undo,
        )
        self.last_estimate = estimate
        self._latest = UpdateRecord(names, estimate.measure, values, stderr, weights)
        self._report(trainer, estimate)
        return weights

    def resolve_pending_check(self) -> None:
        """Act on a bad value of the last update (:class:`~lightning_ntk.validity.DeferredValidityCheck`):
        raise, or warn with ``on_nonfinite="skip"``. Runs before the step's optimizer step (a module with
        ``capture_step=True`` calls it before its replay); harmless to call again."""
        self.validity.resolve()

    def _undo_for(self, estimate: TraceEstimate) -> Any:
        """What puts back the averages and what ``last_*`` report, should this update's values be bad."""
        restore_averages = None if self.trace_averager is None else self.trace_averager.snapshot()
        latest, last_estimate = self._latest, self.last_estimate

        def undo() -> None:
            if restore_averages is not None:
                restore_averages()
            self._latest, self.last_estimate = latest, last_estimate

        return undo

    def _report(self, trainer: pl.Trainer, estimate: TraceEstimate) -> None:
        if not self._reported_paths and "paths" in estimate.info:
            rank_zero_info(f"lightning_ntk: exact NTK traces computed per term with paths {estimate.info['paths']}")
            self._reported_paths = True
        if due(trainer, self._last_logged_step):
            self._log(trainer)
            self._last_logged_step = trainer.global_step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Acts on a non-finite or non-positive value of this step's update before the parameters change."""
        self.resolve_pending_check()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Acts on a bad value of this step's update if no optimizer step did (see :meth:`update_weights`)."""
        self.resolve_pending_check()

    @property
    def last_values(self) -> dict[str, float]:
        """Values used at the last update (traces, or gradient norms with ``estimator="grad_norm"``;
        averaged with ``trace_averager``), reduced over ranks."""
        return {} if self._latest is None else self._latest.as_dict(self._latest.values)

    @property
    def last_traces(self) -> dict[str, float]:
        """:attr:`last_values` under the NTK name."""
        return self.last_values

    @property
    def last_weights(self) -> dict[str, float]:
        """Weights computed at the last update (applied unless ``monitor_only``)."""
        return {} if self._latest is None else self._latest.as_dict(self._latest.weights)

    def _log(self, trainer: pl.Trainer) -> None:
        # Written straight to the loggers (as LearningRateMonitor does): recorded at the update's own step.
        log_metrics(trainer, self._latest.metrics())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_update_step": self._last_update_step,
            "last_logged_step": self._last_logged_step,
            "monitored_weights": None if self._monitored_weights is None else self._monitored_weights.detach().cpu(),
            "trace_averager": None if self.trace_averager is None else self.trace_averager.state_dict(),
            "generator_state": self.rng.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_update_step = int(state_dict["last_update_step"])
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))
        self._monitored_weights = state_dict.get("monitored_weights")
        if self.trace_averager is not None and state_dict.get("trace_averager") is not None:
            self.trace_averager.load_state_dict(state_dict["trace_averager"])
        self.rng.load_state_dict(state_dict.get("generator_state"))

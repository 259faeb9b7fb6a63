r"""
NTK Weighting Callback
^^^^^^^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten
from typing_extensions import override

from lightning_ntk import tags
from lightning_ntk.averaging import TraceAverager
from lightning_ntk.capture import CapturedCall
from lightning_ntk.causal import CausalResiduals
from lightning_ntk.contract import evaluate_residuals, nonfinite_rows
from lightning_ntk.estimators import Exact, FiniteDifference, TraceEstimate, TraceEstimator, as_estimator
from lightning_ntk.module import PINNModule, require_pinn_module
from lightning_ntk.tensorboard import write_layout
from lightning_ntk.weights import WeightRule, check_values, default_weight_rule

__all__ = ["NTKWeightingCallback"]


def _to_host(flag: Tensor) -> tuple[Tensor, Any]:
    """``flag`` copied to host memory without waiting for it (pinned memory on a GPU), and the CUDA
    event after the copy: waiting on it waits for the update's kernels, not for later work."""
    if flag.device.type != "cuda":
        return flag.clone(), None
    host = torch.empty((), dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@dataclass
class _PendingCheck:
    """An update whose validity is read at the end of its step, with what undoing it needs."""

    valid: tuple[Tensor, Any]
    step: int
    values: Tensor
    estimate: TraceEstimate
    module: PINNModule
    batch: Any
    averager_state: dict[str, Any] | None
    latest: _Latest | None
    last_estimate: TraceEstimate | None


@dataclass(frozen=True)
class _Latest:
    """What the last update measured and set, reduced over ranks, in term order."""

    names: tuple[str, ...]
    measure: str
    values: Tensor
    stderr: Tensor
    weights: Tensor

    def as_dict(self, values: Tensor) -> dict[str, float]:
        return dict(zip(self.names, values.tolist(), strict=True))


class NTKWeightingCallback(Callback):
    r"""Weights the loss terms of a :class:`~lightning_ntk.PINNModule` by their NTK block traces.

    At optimizer step 0 and then every ``update_every_n_steps`` optimizer steps, *before* that step's
    forward pass, the callback estimates ``Tr K_ii`` for every term on the current training batch
    with ``estimator``, sums the traces (and point counts) over all ranks with
    ``trainer.strategy.reduce``, optionally averages the estimates over updates (``trace_averager``),
    turns them into weights with ``weight_rule`` (by default ``λ_i = Σ_j Tr K_jj / Tr K_ii``; with
    causal terms JAX-PI's per-point ``λ_i = mean_j(Tr K_jj / N_j) / (Tr K_ii / N_i)``), and writes
    them in place into the module's ``ntk_weights`` buffer. No step trains with unset weights: step 0
    already uses NTK weights.

    Traces are summed over ranks, not averaged, because the sum is exactly the block trace of the NTK
    of the global batch (the concatenation of the ranks' batches), so a DDP run weights its terms
    like a single-device run on the same points. Every rank then computes the same weights.

    With gradient accumulation the weights are updated once per optimizer step, on its first
    micro-batch. Validation, sanity checks and prediction never touch the weights. Updates log
    ``ntk/trace/<term>``, ``ntk/trace_stderr/<term>`` and ``ntk/weight/<term>`` to every logger at the
    current ``global_step``, at most once per ``Trainer(log_every_n_steps=...)`` steps (every update
    when updates are rarer than that), and ``ntk/residual_time_avg``, the running time-average of the
    weighted training loss ``Σ_i w_i L_i``. The schedule, the random generator, the trace averages
    (and, with ``monitor_only``, the monitored weights) are saved in checkpoints; the applied weights
    are saved with the module. Spectra are the job of :class:`~lightning_ntk.NTKSpectrumMonitor`.

    One route for every update: ``estimate = estimator(module, batch)``, combined over ranks by the
    estimate itself (:meth:`~lightning_ntk.estimators.TraceEstimate.reduce`), checked, averaged, then
    ``weight_rule(values, rows, previous)``. The callback never branches on what was measured.

    **Gradient-norm weighting, for comparison (not the NTK).** ``estimator="grad_norm"``
    (:class:`~lightning_ntk.estimators.GradNorm`) measures the terms' loss-gradient norms instead of
    traces; the default rule then gives ``λ_i = Σ_j ‖∇_θ L_j‖ / ‖∇_θ L_i‖`` (the JAX-PI default, after
    Wang, Teng & Perdikaris 2021; what several PyTorch libraries call "NTK weighting"), logged as
    ``grad_norm/<term>`` next to the same ``ntk/weight/<term>``, so that runs of both overlay in
    TensorBoard. Rank gradients are averaged before the norms are taken.

    **Causal terms.** For a module with ``causal`` terms (:class:`~lightning_ntk.CausalWeighting`) the
    estimator measures each such term through its scaled residual ``√s_n · r_n``
    (:class:`~lightning_ntk.causal.CausalResiduals`, weights from the update's batch), so the trace is
    JAX-PI's causal combination ``Σ_n s_n ‖∂r_n/∂θ‖² = N · mean_k(w_k · mean_{n∈k} ‖∂r_n/∂θ‖²)`` with every
    estimator, and ``grad_norm`` measures the gradient of the causal loss.

    **Per-step weighting with a sketch.** ``estimator="fd", update_every_n_steps=1,
    trace_averager=TraceAverager(0.99)`` starts from exact traces at the first update (once, about
    one to two training steps), then estimates the traces from one random direction on an eighth of
    the points each step and averages the noisy estimates over about 100 steps before turning them
    into weights. The logged standard error is then that of the average (NaN while it is unknown).

    Override :meth:`should_update` to change the schedule.

    Example::

        import lightning.pytorch as pl
        from lightning_ntk import NTKWeightingCallback, TraceAverager, WeightRule

        ntk = NTKWeightingCallback(update_every_n_steps=100, weight_rule=WeightRule(ema=0.9))
        trainer = pl.Trainer(max_steps=10_000, callbacks=[ntk])
        trainer.fit(model, datamodule)   # model: a PINNModule
        ntk.last_weights                 # {'bc': 97.3, 'pde': 1.01}

        # Per-step weights from the finite-difference sketch, averaged over steps:
        ntk = NTKWeightingCallback(update_every_n_steps=1, estimator="fd", trace_averager=TraceAverager(0.99))

    Args:
        update_every_n_steps: Recompute the weights every this many optimizer steps (step 0 included).
        estimator: A :class:`~lightning_ntk.estimators.TraceEstimator` (``Exact(chunk_size=...)``,
            ``Hutchinson(num_probes=...)``, ``FiniteDifference(...)``, …) or the name of one with its
            defaults: ``"exact"``, ``"subsample"``, ``"hutchinson"``, ``"hutchpp"``, ``"fd"``, ``"auto"``,
            or ``"grad_norm"`` (loss-gradient norms instead of traces).
        weight_rule: Turns traces into weights: mode, smoothing, clamps. Default
            (:func:`~lightning_ntk.weights.default_weight_rule`, chosen at ``setup``): ``WeightRule()``,
            or ``WeightRule(mode="mean_trace")`` (JAX-PI's per-point rule) for NTK traces of a module
            with causal terms.
        trace_averager: Averages the trace *estimates* across updates before weighting (for
            sketches); ``None`` uses each estimate alone.
        monitor_only: Compute and log the weights NTK weighting would use, but never apply them.
        seed: Seeds the callback's random generator (offset by the global rank, so ranks draw
            independent probes); ``None`` draws the seed from torch's global RNG at fit start.
        on_nonfinite: What to do when a trace is NaN, infinite or zero: ``"raise"`` (an error naming
            the term and the step) or ``"skip"`` (warn, keep the previous weights for this update).
        capture: Replay the ``exact`` and ``fd`` trace computations from a CUDA graph per batch layout
            (:class:`~lightning_ntk.capture.CapturedCall`; on a GPU a launch-bound computation becomes one
            replay). The first replay is checked against an eager call, and a computation that cannot
            be captured runs eagerly with one warning. On a CPU the same buffers are used eagerly.
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
        if isinstance(update_every_n_steps, bool) or not isinstance(update_every_n_steps, int):
            raise MisconfigurationException(
                f"`update_every_n_steps` must be a positive int, got {update_every_n_steps!r}."
            )
        if update_every_n_steps < 1:
            raise MisconfigurationException(
                f"`update_every_n_steps` must be >= 1 (1 = every optimizer step), got {update_every_n_steps}."
            )
        try:
            self.estimator = as_estimator(estimator)
        except ValueError as err:
            raise MisconfigurationException(f"`estimator`: {err}") from err
        for name, value, cls in (
            ("weight_rule", weight_rule, WeightRule),
            ("trace_averager", trace_averager, TraceAverager),
        ):
            if value is not None and not isinstance(value, cls):
                raise MisconfigurationException(
                    f"`{name}` must be a lightning_ntk.{cls.__name__} or None, got {type(value).__name__}."
                )
        if on_nonfinite not in ("raise", "skip"):
            raise MisconfigurationException(f"`on_nonfinite` must be 'raise' or 'skip', got {on_nonfinite!r}.")
        if not isinstance(capture, bool):
            raise MisconfigurationException(f"`capture` must be True or False, got {capture!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise MisconfigurationException(f"`seed` must be an int or None, got {seed!r}.")
        self.update_every_n_steps = update_every_n_steps
        # Without a rule given, the default depends on the module (causal terms or not): set in setup.
        self._default_rule = weight_rule is None
        self.weight_rule = weight_rule if weight_rule is not None else default_weight_rule()
        self.trace_averager = trace_averager
        self.monitor_only = monitor_only
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self._warned_diverged = False
        self.capture = capture
        self._captured: dict[tuple, tuple[CapturedCall, dict[str, TraceEstimate]]] = {}
        self.last_estimate: TraceEstimate | None = None
        # Optimizer step of the last update; -1 = none yet. Guards against updating on every
        # micro-batch of an accumulated step, and is what a resumed run continues from.
        self._last_update_step = -1
        self._last_logged_step = -1
        self._monitored_weights: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self._latest: _Latest | None = None
        self._reported_paths = False
        self._causal_view: CausalResiduals | None = None
        self._check: _PendingCheck | None = None
        # Running sum of the weighted loss over steps, kept on the device (no sync per step).
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0

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
        if self._default_rule:
            assert isinstance(pl_module, PINNModule)
            grad_norms = self.estimator.name == "grad_norm"
            self.weight_rule = default_weight_rule(grad_norms=grad_norms, causal=bool(pl_module.causal))

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

        Nothing here reads a device value on the host, so a GPU never waits for it (and a CUDA graph
        can hold it): whether every value was finite and positive is decided on the device, the weights
        stay the previous ones where it was not, and the flag is read before the same step's optimizer
        step (:meth:`on_before_optimizer_step`, else at the end of the step), which raises or warns
        naming the step and the term, with the parameters still those the values were measured at.
        """
        self.resolve_pending_check()
        names = pl_module.terms
        estimate = self._estimate(self._estimator_now(), pl_module, batch)
        values, rows, variances = estimate.reduce(names, lambda t, op: trainer.strategy.reduce(t, reduce_op=op))
        valid = (torch.isfinite(values) & (values > 0)).all()
        averager_state = None if self.trace_averager is None else dict(vars(self.trace_averager))
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
        self._check = _PendingCheck(
            valid=_to_host(valid),
            step=trainer.global_step,
            values=values,
            estimate=estimate,
            module=pl_module,
            batch=batch,
            averager_state=averager_state,
            latest=self._latest,
            last_estimate=self.last_estimate,
        )
        self.last_estimate = estimate
        self._latest = _Latest(names, estimate.measure, values, stderr, weights)
        self._report(trainer, estimate)
        return weights

    def _estimate(self, estimator: TraceEstimator, pl_module: PINNModule, batch: Any) -> TraceEstimate:
        """The estimate of ``batch``, from a :class:`CapturedCall` where that applies."""
        leaves, spec = tree_flatten(batch)
        capturable = isinstance(estimator, (Exact, FiniteDifference)) and leaves
        if not (self.capture and capturable and all(isinstance(t, Tensor) for t in leaves)):
            return estimator(self._measured(pl_module, batch), batch, self._generator)
        key = (id(estimator), id(pl_module), str(spec))
        if key not in self._captured:
            names = pl_module.terms
            last: dict[str, TraceEstimate] = {}

            def measure(*tensors: Tensor) -> tuple[Tensor, Tensor]:
                inner = tree_unflatten(list(tensors), spec)
                est = last["estimate"] = estimator(self._measured(pl_module, inner), inner, self._generator)
                return torch.stack([est.values[n] for n in names]), torch.stack([est.stderr[n] for n in names])

            generators = (lambda: [self._generator]) if estimator.randomized else list
            call = CapturedCall(
                measure,
                state=lambda: [p for p in pl_module.parameters() if p.requires_grad],
                generators=generators,
                name=f"{type(estimator).__name__} traces",
            )
            self._captured[key] = (call, last)
        call, last = self._captured[key]
        values, stderr = call(*leaves)
        meta = last["estimate"]  # what the last Python run of the estimator said besides the numbers
        names = pl_module.terms
        return TraceEstimate(
            dict(zip(names, values.unbind(0), strict=True)),
            dict(zip(names, stderr.unbind(0), strict=True)),
            meta.num_rows,
            meta.estimator,
            meta.info,
            meta.measure,
        )

    def resolve_pending_check(self) -> None:
        """Read the last update's validity flag (by now long computed) and act on a bad one: raise, or
        warn with ``on_nonfinite="skip"``. Runs before the step's optimizer step (a module with
        ``capture_step=True`` calls it before its replay); harmless to call again."""
        check, self._check = self._check, None
        if check is None:
            return
        flag, event = check.valid
        if event is not None:
            event.synchronize()
        if bool(flag):
            return
        # Undo what the bad values touched: the averages, and what `last_*` report.
        if check.averager_state is not None:
            vars(self.trace_averager).update(check.averager_state)
        self._latest, self.last_estimate = check.latest, check.last_estimate
        try:
            check_values(check.values, check.module.terms, check.estimate.quantity)
        except (FloatingPointError, ValueError) as err:
            diverged = _nonfinite_parameters(check.module)
            message = f"At optimizer step {check.step}: {self._explain(err, check.module, check.batch, check.estimate)}"
            if self.on_nonfinite == "raise":
                raise type(err)(message) from err
            if diverged and self._warned_diverged:
                return  # said once: the weights cannot come back while the model stays non-finite
            self._warned_diverged = bool(diverged)
            more = " Later steps skip without a warning while the parameters stay non-finite." if diverged else ""
            # Every rank sees the same reduced values, so every rank skips together.
            rank_zero_warn(f"{message} Keeping the previous weights (on_nonfinite='skip').{more}")

    @staticmethod
    def _explain(err: Exception, pl_module: PINNModule, batch: Any, estimate: TraceEstimate) -> str:
        """The check's message, led by what is non-finite first: the parameters, or this rank's residuals."""
        if not isinstance(err, FloatingPointError):
            return str(err)
        diverged = _nonfinite_parameters(pl_module)
        if diverged:
            total = sum(1 for p in pl_module.parameters() if p.requires_grad)
            return (
                f"the parameters of the model are not finite ({len(diverged)} of {total} tensors, first "
                f"{diverged[0]!r}): training diverged before this update, so no weight can repair it, and "
                f"every {estimate.quantity} is NaN. Lower the learning rate, clip gradients, or resume from an "
                "earlier checkpoint."
            )
        rows = nonfinite_rows(evaluate_residuals(pl_module, batch, pl_module.terms))
        if not rows:
            return f"{err} (The residuals on this rank are finite: the Jacobian or another rank's points are not.)"
        where = "; ".join(f"the residual of term {name!r} is {words}" for name, words in rows.items())
        return (
            f"{where}, so its {estimate.quantity} is not finite. Check the residual for NaN/Inf (division by "
            "zero, log of a negative, an exploding network, points outside the domain)."
        )

    def _measured(self, pl_module: PINNModule, batch: Any) -> PINNModule | CausalResiduals:
        """What the estimator measures: the module, or with causal terms the view of it whose causal
        residuals are scaled by this batch's causal weights (so every estimator takes the causal trace)."""
        if not pl_module.causal and not pl_module.point_weights:
            return pl_module
        # One view per module, kept: the exact path remembers its layouts per measured module.
        if self._causal_view is None or self._causal_view.inner is not pl_module:
            points = pl_module.residual_points if pl_module.causal else None
            self._causal_view = CausalResiduals(pl_module, pl_module.causal, points, lambda: pl_module.point_weights)
        return self._causal_view.freeze(batch)

    def _estimator_now(self) -> TraceEstimator:
        """The estimator of this update: exact traces start an empty average with ``start="exact"``."""
        averager = self.trace_averager
        if averager is not None and averager.empty and averager.start == "exact" and self.estimator.randomized:
            return Exact()
        return self.estimator

    def _report(self, trainer: pl.Trainer, estimate: TraceEstimate) -> None:
        if not self._reported_paths and "paths" in estimate.info:
            rank_zero_info(f"lightning_ntk: exact NTK traces computed per term with paths {estimate.info['paths']}")
            self._reported_paths = True
        step = trainer.global_step
        if self._last_logged_step < 0 or step - self._last_logged_step >= max(1, trainer.log_every_n_steps):
            self._log(trainer)
            self._last_logged_step = step

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
        """Acts on a bad value of this step's update if no optimizer step did (see
        :meth:`update_weights`), and accumulates the weighted loss for ``ntk/residual_time_avg``,
        logged at the log cadence."""
        self.resolve_pending_check()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        loss = loss.detach()
        self._loss_sum = loss.clone() if self._loss_sum is None else self._loss_sum + loss
        self._loss_steps += 1
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            average = float(self._loss_sum) / self._loss_steps
            for logger in trainer.loggers:
                logger.log_metrics({tags.RESIDUAL_TIME_AVERAGE: average}, step=trainer.global_step)

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
        latest = self._latest
        # One transfer to the host for all scalars.
        values, stderr, weights = torch.stack([latest.values, latest.stderr, latest.weights]).tolist()
        metrics = {}
        for name, v, e, w in zip(latest.names, values, stderr, weights, strict=True):
            metrics[tags.scalar(latest.measure, name)] = v
            metrics[tags.stderr(latest.measure, name)] = e
            metrics[tags.scalar(tags.WEIGHT, name)] = w
        # Written straight to the loggers (as LearningRateMonitor does), so updates are recorded at
        # their own step whatever the module logs.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().cpu()

        return {
            "last_update_step": self._last_update_step,
            "last_logged_step": self._last_logged_step,
            "monitored_weights": cpu(self._monitored_weights),
            "trace_averager": None if self.trace_averager is None else self.trace_averager.state_dict(),
            "generator_state": None if self._generator is None else self._generator.get_state(),
            "loss_sum": cpu(self._loss_sum),
            "loss_steps": self._loss_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_update_step = int(state_dict["last_update_step"])
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))
        self._monitored_weights = state_dict.get("monitored_weights")
        if self.trace_averager is not None and state_dict.get("trace_averager") is not None:
            self.trace_averager.load_state_dict(state_dict["trace_averager"])
        self._loss_sum = state_dict.get("loss_sum")
        self._loss_steps = int(state_dict.get("loss_steps", 0))
        # The generator is made at fit start, on the module's device; a state loaded earlier waits for it.
        self._pending_generator_state = state_dict.get("generator_state")
        if self._generator is not None and self._pending_generator_state is not None:
            self._generator.set_state(self._pending_generator_state)
            self._pending_generator_state = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Creates the random generator on the module's device (known only now) and moves restored state there."""
        device = pl_module.device
        self._generator = torch.Generator(device=device)
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._generator.manual_seed(seed + trainer.global_rank)
        if self._pending_generator_state is not None:
            self._generator.set_state(self._pending_generator_state)
            self._pending_generator_state = None
        # Averages restored from a checkpoint live on the CPU until the module's device is known.
        if isinstance(pl_module, PINNModule):
            write_layout(trainer, pl_module.terms, tuple(pl_module.causal))
        if self.trace_averager is not None:
            self.trace_averager.to(device)
        for attr in ("_monitored_weights", "_loss_sum"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, value.to(device))


def _nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding NaN or Inf (read on the host: failure path only)."""
    return [name for name, p in module.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]

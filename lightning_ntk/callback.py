r"""
NTK Weighting Callback
^^^^^^^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_ntk.estimators import ESTIMATORS, TraceEstimate, get_estimator
from lightning_ntk.module import PINNModule
from lightning_ntk.spectrum import Spectrum, ntk_eigenvalues
from lightning_ntk.tensorboard import add_histogram, write_layout
from lightning_ntk.traces import estimate_ntk_traces
from lightning_ntk.weights import MODES, check_traces, clamp_weights, ema_update, ntk_weights

__all__ = ["NTKWeightingCallback"]


class NTKWeightingCallback(Callback):
    r"""Weights the loss terms of a :class:`~lightning_ntk.PINNModule` by their NTK block traces.

    At optimizer step 0 and then every ``update_every_n_steps`` optimizer steps, *before* that step's
    forward pass, the callback computes ``Tr K_ii`` for every term on the current training batch,
    sums the traces (and point counts) over all ranks with ``trainer.strategy.reduce``, turns them
    into weights (``mode="trace"``: ``λ_i = Σ_j Tr K_jj / Tr K_ii``), optionally smooths them
    (``w ← ema·w + (1−ema)·λ``) and clamps them, and writes them in place into the module's
    ``ntk_weights`` buffer. No step trains with unset weights: step 0 already uses NTK weights.

    Traces are summed over ranks, not averaged, because the sum is exactly the block trace of the NTK
    of the global batch (the concatenation of the ranks' batches), so a DDP run weights its terms
    like a single-device run on the same points. Every rank then computes the same weights.

    With gradient accumulation the weights are updated once per optimizer step, on its first
    micro-batch. Validation, sanity checks and prediction never touch the weights. Updates log
    ``ntk/trace/<term>``, ``ntk/trace_stderr/<term>`` and ``ntk/weight/<term>`` to every logger at the
    current ``global_step``, at most once per ``Trainer(log_every_n_steps=...)`` steps (every update
    when updates are rarer than that). The schedule, the random generator, the trace averages (and,
    with ``monitor_only``, the monitored weights) are saved in checkpoints; the applied weights are
    saved with the module.

    **Per-step weighting with a sketch.** ``estimator="fd", update_every_n_steps=1, trace_ema=0.99``
    costs two residual evaluations per step (one probe) and averages the noisy trace estimates over
    steps before turning them into weights: the weights follow ``λ(EMA of traces)``. The logged
    standard error is then that of the average, ``√(v (1−β)/(1+β))`` with ``v`` the exponentially
    weighted variance of the estimates (which includes real drift of the traces, so it is
    conservative).

    Override :meth:`should_update` to change the schedule.

    Example::

        import lightning.pytorch as pl
        from lightning_ntk import NTKWeightingCallback

        ntk = NTKWeightingCallback(update_every_n_steps=100, mode="trace", ema=0.9)
        trainer = pl.Trainer(max_steps=10_000, callbacks=[ntk])
        trainer.fit(model, datamodule)   # model: a PINNModule
        ntk.last_weights                 # {'bc': 97.3, 'pde': 1.01}

        # Per-step weights from a one-probe finite-difference sketch, averaged over steps:
        ntk = NTKWeightingCallback(update_every_n_steps=1, estimator="fd", trace_ema=0.99, seed=0)

    Args:
        update_every_n_steps: Recompute the weights every this many optimizer steps (step 0 included).
        estimator: Trace estimator name: ``"exact"``, ``"subsample"``, ``"hutchinson"``, ``"hutchpp"``,
            ``"fd"`` or ``"auto"`` (see :mod:`lightning_ntk.estimators`).
        mode: ``"trace"`` (Wang et al. 2022) or ``"mean_trace"`` (the JAX-PI rule on mean diagonals).
        ema: Smoothing of the weights across updates in ``[0, 1)``; ``0`` overwrites.
        min_weight: Lower clamp for the weights, or ``None``.
        max_weight: Upper clamp for the weights, or ``None``.
        estimator_options: Keyword options for the estimator, e.g. ``{"chunk_size": 256}``.
        monitor_only: Compute and log the weights NTK weighting would use, but never apply them.
        num_probes: Probes (or points, for ``"subsample"``) per update for the randomized estimators;
            ``None`` keeps each estimator's default.
        trace_ema: Average the trace *estimates* across updates with this factor in ``[0, 1)``
            before computing weights (variance reduction for sketches); ``0`` uses each estimate alone.
        seed: Seeds the callback's random generator (offset by the global rank, so ranks draw
            independent probes); ``None`` draws the seed from torch's global RNG at fit start.
        on_nonfinite: What to do when a trace is NaN, infinite or zero: ``"raise"`` (an error naming
            the term and the step) or ``"skip"`` (warn, keep the previous weights for this update).
        spectrum_every_n_updates: Every this many weight updates (the first included), compute the
            top ``spectrum_k`` eigenvalues of every block ``K_ii`` on rank zero's batch and log
            ``ntk/eig/<term>/1..k``, ``ntk/cond/<term>`` (``λ_1/λ_k``), ``ntk/effective_rank/<term>``
            (``Tr/λ_1``), ``ntk/top_k_fraction/<term>`` and, for TensorBoard, a histogram
            ``ntk/eig_hist/<term>``. ``None`` (default) keeps updates cheap.
        spectrum_k: How many eigenvalues per block.
        spectrum_method: ``"exact"``, ``"lanczos"`` or ``"auto"`` (see :func:`lightning_ntk.ntk_eigenvalues`).

    The callback also logs ``ntk/residual_time_avg``, the running time-average of the weighted
    training loss ``Σ_i w_i L_i`` (the quantity whose time-average the convergence result of Hirsch &
    Pichi drives to zero), and writes a TensorBoard custom-scalars layout at fit start.
    """

    def __init__(
        self,
        update_every_n_steps: int = 100,
        estimator: str = "exact",
        mode: Literal["trace", "mean_trace"] = "trace",
        ema: float = 0.0,
        min_weight: float | None = None,
        max_weight: float | None = None,
        estimator_options: Mapping[str, Any] | None = None,
        monitor_only: bool = False,
        num_probes: int | None = None,
        trace_ema: float = 0.0,
        seed: int | None = None,
        on_nonfinite: Literal["raise", "skip"] = "raise",
        spectrum_every_n_updates: int | None = None,
        spectrum_k: int = 5,
        spectrum_method: Literal["auto", "exact", "lanczos"] = "auto",
    ) -> None:
        if isinstance(update_every_n_steps, bool) or not isinstance(update_every_n_steps, int):
            raise MisconfigurationException(
                f"`update_every_n_steps` must be a positive int, got {update_every_n_steps!r}."
            )
        if update_every_n_steps < 1:
            raise MisconfigurationException(
                f"`update_every_n_steps` must be >= 1 (1 = every optimizer step), got {update_every_n_steps}."
            )
        if estimator not in ESTIMATORS:
            raise MisconfigurationException(f"Unknown `estimator` {estimator!r}; choose one of {sorted(ESTIMATORS)}.")
        if mode not in MODES:
            raise MisconfigurationException(f"Unknown `mode` {mode!r}; choose one of {list(MODES)}.")
        for name, value in (("ema", ema), ("trace_ema", trace_ema)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise MisconfigurationException(
                    f"`{name}` must be a number in [0, 1) (0 = no smoothing), got {value!r}."
                )
        if num_probes is not None and (
            isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1
        ):
            raise MisconfigurationException(f"`num_probes` must be a positive int or None, got {num_probes!r}.")
        if spectrum_every_n_updates is not None and (
            isinstance(spectrum_every_n_updates, bool)
            or not isinstance(spectrum_every_n_updates, int)
            or spectrum_every_n_updates < 1
        ):
            raise MisconfigurationException(
                f"`spectrum_every_n_updates` must be a positive int or None, got {spectrum_every_n_updates!r}."
            )
        if isinstance(spectrum_k, bool) or not isinstance(spectrum_k, int) or spectrum_k < 1:
            raise MisconfigurationException(f"`spectrum_k` must be a positive int, got {spectrum_k!r}.")
        if spectrum_method not in ("auto", "exact", "lanczos"):
            raise MisconfigurationException(
                f"`spectrum_method` must be 'auto', 'exact' or 'lanczos', got {spectrum_method!r}."
            )
        if on_nonfinite not in ("raise", "skip"):
            raise MisconfigurationException(f"`on_nonfinite` must be 'raise' or 'skip', got {on_nonfinite!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise MisconfigurationException(f"`seed` must be an int or None, got {seed!r}.")
        for name, bound in (("min_weight", min_weight), ("max_weight", max_weight)):
            if bound is not None and (not isinstance(bound, (int, float)) or not bound > 0):
                raise MisconfigurationException(f"`{name}` must be a positive number or None, got {bound!r}.")
        if min_weight is not None and max_weight is not None and min_weight > max_weight:
            raise MisconfigurationException(f"`min_weight` ({min_weight}) is larger than `max_weight` ({max_weight}).")
        if estimator_options is not None and not isinstance(estimator_options, Mapping):
            raise MisconfigurationException(
                f"`estimator_options` must be a mapping of keyword options, got {type(estimator_options).__name__}."
            )
        self.update_every_n_steps = update_every_n_steps
        self.estimator = estimator
        self.mode = mode
        self.ema = float(ema)
        self.min_weight = min_weight
        self.max_weight = max_weight
        self.estimator_options = dict(estimator_options or {})
        self.monitor_only = monitor_only
        self.num_probes = num_probes
        self.trace_ema = float(trace_ema)
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self.spectrum_every_n_updates = spectrum_every_n_updates
        self.spectrum_k = spectrum_k
        self.spectrum_method = spectrum_method
        self._num_updates = 0
        self._warned_no_tensorboard = False
        # Running sum of the weighted loss over steps, kept on the device (no sync per step).
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0
        self.last_spectra: dict[str, Spectrum] = {}

        # Optimizer step of the last update; -1 = none yet. Guards against updating on every
        # micro-batch of an accumulated step, and is what a resumed run continues from.
        self._last_update_step = -1
        self._monitored_weights: Tensor | None = None
        self._last_logged_step = -1
        # Running mean and exponentially weighted variance of the trace estimates (trace_ema > 0).
        self._trace_mean: Tensor | None = None
        self._trace_var: Tensor | None = None
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self.last_estimate: TraceEstimate | None = None
        self._latest: tuple[tuple[str, ...], Tensor, Tensor, Tensor] | None = None
        self._reported_paths = False

    def should_update(self, step: int) -> bool:
        """Whether to recompute the weights before optimizer step ``step`` (zero-based).

        The default is every ``update_every_n_steps`` steps, step 0 included.
        """
        return step % self.update_every_n_steps == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks that the module follows the :class:`~lightning_ntk.PINNModule` contract."""
        if not isinstance(pl_module, PINNModule):
            raise MisconfigurationException(
                f"NTKWeightingCallback needs a lightning_ntk.PINNModule, got {type(pl_module).__name__}. "
                "Subclass PINNModule, declare `terms` and implement `residuals(batch)`."
            )
        if type(pl_module).residuals is PINNModule.residuals:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} does not implement `residuals(batch)`; NTK traces need it."
            )
        get_estimator(self.estimator)  # fails early if an estimator was unregistered after construction

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
        """Compute traces on ``batch``, reduce them across ranks, and set (or monitor) the weights."""
        names = pl_module.terms
        options = dict(self.estimator_options)
        if self.num_probes is not None:
            options["num_probes"] = self.num_probes
        options.setdefault("generator", self._generator)
        estimate = estimate_ntk_traces(pl_module, batch, self.estimator, **options)
        traces = torch.stack([estimate.traces[name].detach() for name in names])
        rows = torch.tensor([float(estimate.num_rows[name]) for name in names], device=traces.device)
        variances = torch.stack([estimate.stderr[name].detach() for name in names]).square()
        # One collective for everything: traces and point counts add up over ranks (the NTK of the
        # global batch), and so do the variances of independent estimates.
        packed = trainer.strategy.reduce(torch.cat([traces, rows.to(traces), variances.to(traces)]), reduce_op="sum")
        traces, rows, variances = packed.split(len(names))
        try:
            check_traces(traces, names)
        except (FloatingPointError, ValueError) as err:
            message = f"At optimizer step {trainer.global_step}: {err}"
            if self.on_nonfinite == "raise":
                raise type(err)(message) from err
            # Every rank sees the same reduced traces, so every rank skips together.
            rank_zero_warn(f"{message} Keeping the previous weights (on_nonfinite='skip').")
            return pl_module.ntk_weights.detach().clone()
        traces, stderr = self._average_traces(traces, variances)

        weights = ntk_weights(traces, self.mode, rows)
        if self.ema > 0.0:
            previous = self._monitored_weights if self.monitor_only else pl_module.ntk_weights
            if previous is None:
                previous = torch.ones_like(weights)
            weights = ema_update(previous, weights, self.ema)
        weights = clamp_weights(weights, self.min_weight, self.max_weight)
        if self.monitor_only:
            self._monitored_weights = weights.detach().clone()
        else:
            pl_module.set_term_weights(weights.to(pl_module.ntk_weights))

        self.last_estimate = estimate
        self._latest = (names, traces, stderr, weights)
        if not self._reported_paths and "paths" in estimate.info:
            rank_zero_info(f"lightning_ntk: exact NTK traces computed per term with paths {estimate.info['paths']}")
            self._reported_paths = True
        step = trainer.global_step
        if self._last_logged_step < 0 or step - self._last_logged_step >= max(1, trainer.log_every_n_steps):
            self._log(trainer)
            self._last_logged_step = step
        if self.spectrum_every_n_updates is not None and self._num_updates % self.spectrum_every_n_updates == 0:
            self.log_spectra(trainer, pl_module, batch)
        self._num_updates += 1
        return weights

    def log_spectra(self, trainer: pl.Trainer, pl_module: PINNModule, batch: Any) -> None:
        """Top eigenvalues of every diagonal block on this rank's batch, logged from rank zero."""
        if not trainer.is_global_zero:
            return  # no collective inside: other ranks need not wait
        metrics: dict[str, float] = {}
        for name in pl_module.terms:
            rows = self.last_estimate.num_rows[name] if self.last_estimate else self.spectrum_k
            # This rank's own trace estimate (before the reduction over ranks) belongs to this batch.
            local_trace = self.last_estimate.traces[name] if self.last_estimate else None
            spec = ntk_eigenvalues(
                pl_module,
                batch,
                k=min(self.spectrum_k, rows),
                term=name,
                method=self.spectrum_method,
                generator=self._generator,
                trace=local_trace,
            )
            self.last_spectra[name] = spec
            for j, value in enumerate(spec.eigenvalues.tolist(), start=1):
                metrics[f"ntk/eig/{name}/{j}"] = value
            metrics[f"ntk/cond/{name}"] = float(spec.condition_ratio)
            metrics[f"ntk/effective_rank/{name}"] = float(spec.effective_rank)
            metrics[f"ntk/top_k_fraction/{name}"] = float(spec.top_k_fraction)
            shown = add_histogram(trainer, f"ntk/eig_hist/{name}", spec.eigenvalues, trainer.global_step)
            if not shown and trainer.loggers and not self._warned_no_tensorboard:
                rank_zero_warn(
                    "NTKWeightingCallback: eigenvalue histograms need a TensorBoardLogger; the other loggers "
                    "get the eigenvalues as scalars only."
                )
                self._warned_no_tensorboard = True
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Accumulates the weighted loss for ``ntk/residual_time_avg`` and logs it at the log cadence."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        loss = loss.detach()
        self._loss_sum = loss.clone() if self._loss_sum is None else self._loss_sum + loss
        self._loss_steps += 1
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            average = float(self._loss_sum) / self._loss_steps
            for logger in trainer.loggers:
                logger.log_metrics({"ntk/residual_time_avg": average}, step=trainer.global_step)

    @property
    def last_traces(self) -> dict[str, float]:
        """Traces used at the last update (averaged when ``trace_ema > 0``), reduced over ranks."""
        return self._latest_as_dict(1)

    @property
    def last_weights(self) -> dict[str, float]:
        """Weights computed at the last update (applied unless ``monitor_only``)."""
        return self._latest_as_dict(3)

    def _latest_as_dict(self, slot: int) -> dict[str, float]:
        if self._latest is None:
            return {}
        return dict(zip(self._latest[0], self._latest[slot].tolist(), strict=True))

    def _average_traces(self, traces: Tensor, variances: Tensor) -> tuple[Tensor, Tensor]:
        if self.trace_ema == 0.0:
            return traces, variances.sqrt()
        beta = self.trace_ema
        if self._trace_mean is None:
            self._trace_mean = traces.clone()
            self._trace_var = torch.nan_to_num(variances, nan=0.0)
        else:
            assert self._trace_var is not None
            delta = traces - self._trace_mean
            self._trace_mean = self._trace_mean + (1 - beta) * delta
            self._trace_var = beta * (self._trace_var + (1 - beta) * delta.square())
        return self._trace_mean, (self._trace_var * (1 - beta) / (1 + beta)).sqrt()

    def _log(self, trainer: pl.Trainer) -> None:
        names, traces, stderr, weights = self._latest
        # One transfer to the host for all scalars.
        values = torch.stack([traces, stderr, weights]).tolist()
        metrics = {}
        for kind, row in zip(("trace", "trace_stderr", "weight"), values, strict=True):
            metrics.update({f"ntk/{kind}/{name}": v for name, v in zip(names, row, strict=True)})
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
            "trace_mean": cpu(self._trace_mean),
            "trace_var": cpu(self._trace_var),
            "generator_state": None if self._generator is None else self._generator.get_state(),
            "num_updates": self._num_updates,
            "loss_sum": cpu(self._loss_sum),
            "loss_steps": self._loss_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_update_step = int(state_dict["last_update_step"])
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))
        self._monitored_weights = state_dict.get("monitored_weights")
        self._trace_mean = state_dict.get("trace_mean")
        self._trace_var = state_dict.get("trace_var")
        self._num_updates = int(state_dict.get("num_updates", 0))
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
            write_layout(trainer, pl_module.terms)
        for attr in ("_trace_mean", "_trace_var", "_monitored_weights", "_loss_sum"):
            value = getattr(self, attr)
            if value is not None:
                setattr(self, attr, value.to(device))

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
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_ntk.estimators import ESTIMATORS, TraceEstimate, get_estimator
from lightning_ntk.module import PINNModule
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
    micro-batch. Validation, sanity checks and prediction never touch the weights. Every update logs
    ``ntk/trace/<term>`` and ``ntk/weight/<term>`` to every logger at the current ``global_step``.
    The schedule (and, with ``monitor_only``, the monitored weights) is saved in checkpoints; the
    applied weights are saved with the module.

    Override :meth:`should_update` to change the schedule.

    Example::

        import lightning.pytorch as pl
        from lightning_ntk import NTKWeightingCallback

        ntk = NTKWeightingCallback(update_every_n_steps=100, mode="trace", ema=0.9)
        trainer = pl.Trainer(max_steps=10_000, callbacks=[ntk])
        trainer.fit(model, datamodule)   # model: a PINNModule
        ntk.last_weights                 # {'bc': 97.3, 'pde': 1.01}

    Args:
        update_every_n_steps: Recompute the weights every this many optimizer steps (step 0 included).
        estimator: Trace estimator name (``"exact"``; see :func:`lightning_ntk.ntk_traces`).
        mode: ``"trace"`` (Wang et al. 2022) or ``"mean_trace"`` (the JAX-PI rule on mean diagonals).
        ema: Smoothing of the weights across updates in ``[0, 1)``; ``0`` overwrites.
        min_weight: Lower clamp for the weights, or ``None``.
        max_weight: Upper clamp for the weights, or ``None``.
        estimator_options: Keyword options for the estimator, e.g. ``{"chunk_size": 256}``.
        monitor_only: Compute and log the weights NTK weighting would use, but never apply them.
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
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
            raise MisconfigurationException(f"`ema` must be a number in [0, 1) (0 = no smoothing), got {ema!r}.")
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

        # Optimizer step of the last update; -1 = none yet. Guards against updating on every
        # micro-batch of an accumulated step, and is what a resumed run continues from.
        self._last_update_step = -1
        self._monitored_weights: Tensor | None = None
        self.last_estimate: TraceEstimate | None = None
        self.last_traces: dict[str, float] = {}
        self.last_weights: dict[str, float] = {}
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
        estimate = estimate_ntk_traces(pl_module, batch, self.estimator, **self.estimator_options)
        traces = torch.stack([estimate.traces[name].detach() for name in names])
        rows = torch.tensor([float(estimate.num_rows[name]) for name in names], device=traces.device)
        packed = trainer.strategy.reduce(torch.cat([traces, rows.to(traces)]), reduce_op="sum")
        traces, rows = packed[: len(names)], packed[len(names) :]
        try:
            check_traces(traces, names)
        except (FloatingPointError, ValueError) as err:
            raise type(err)(f"At optimizer step {trainer.global_step}: {err}") from err

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
        self.last_traces = dict(zip(names, traces.tolist(), strict=True))
        self.last_weights = dict(zip(names, weights.tolist(), strict=True))
        if not self._reported_paths and "paths" in estimate.info:
            rank_zero_info(f"lightning_ntk: exact NTK traces computed per term with paths {estimate.info['paths']}")
            self._reported_paths = True
        self._log(trainer)
        return weights

    def _log(self, trainer: pl.Trainer) -> None:
        metrics = {f"ntk/trace/{name}": value for name, value in self.last_traces.items()}
        metrics.update({f"ntk/weight/{name}": value for name, value in self.last_weights.items()})
        # Written straight to the loggers (as LearningRateMonitor does) so that every update is
        # recorded, whatever `log_every_n_steps` is.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_update_step": self._last_update_step,
            "monitored_weights": None if self._monitored_weights is None else self._monitored_weights.cpu(),
            "last_traces": dict(self.last_traces),
            "last_weights": dict(self.last_weights),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_update_step = int(state_dict["last_update_step"])
        self._monitored_weights = state_dict.get("monitored_weights")
        self.last_traces = dict(state_dict.get("last_traces", {}))
        self.last_weights = dict(state_dict.get("last_weights", {}))

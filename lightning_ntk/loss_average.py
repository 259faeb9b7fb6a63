"""``LossTimeAverage``: the running time-average of the training loss, logged as ``loss/time_average``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from torch import Tensor
from typing_extensions import override

from lightning_ntk import tags
from lightning_ntk.tensorboard import due, log_metrics

__all__ = ["LossTimeAverage"]


class LossTimeAverage(Callback):
    r"""Logs ``(1/T) Σ_{t<T} Σ_i w_i L_i``, the time-average of the weighted training loss.

    Under adaptive NTK weights this is the quantity whose time-average goes to zero (Hirsch & Pichi):
    it should keep falling. The sum stays on the device (no host read per step) and is read at the
    log cadence (``Trainer(log_every_n_steps=...)``); it is saved in checkpoints.

    Example::

        trainer = pl.Trainer(callbacks=[NTKWeightingCallback(), LossTimeAverage()])
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self._steps = 0
        self._last_logged_step = -1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Adds the step's loss; logs the average on the steps the log cadence names."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, Tensor):
            return
        loss = loss.detach()
        self._sum = loss.clone() if self._sum is None else self._sum + loss
        self._steps += 1
        if due(trainer, self._last_logged_step):
            log_metrics(trainer, {tags.LOSS_TIME_AVERAGE: float(self._sum) / self._steps})
            self._last_logged_step = trainer.global_step

    @property
    def average(self) -> float | None:
        """The current time-average (read on the host), ``None`` before the first step."""
        return None if self._sum is None else float(self._sum) / self._steps

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Moves a restored sum to the module's device."""
        if self._sum is not None:
            self._sum = self._sum.to(pl_module.device)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sum": None if self._sum is None else self._sum.detach().cpu(), "steps": self._steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sum, self._steps = state_dict.get("sum"), int(state_dict.get("steps", 0))

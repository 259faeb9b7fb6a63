r"""
NTK Spectrum Monitor
^^^^^^^^^^^^^^^^^^^^
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_ntk import tags
from lightning_ntk.generators import CallbackGenerator
from lightning_ntk.module import require_pinn_module
from lightning_ntk.spectrum import Spectrum, block_spectra
from lightning_ntk.tensorboard import add_histogram, log_metrics

__all__ = ["NTKSpectrumMonitor"]


class NTKSpectrumMonitor(Callback):
    r"""Logs the top eigenvalues of every NTK block ``K_ii`` of a :class:`~lightning_ntk.PINNModule`.

    At optimizer step 0 and every ``every_n_steps`` optimizer steps, before the forward pass, global
    rank zero computes the top ``k`` eigenvalues of each block on its own training batch and logs
    ``ntk/eig/<term>/1..k``, ``ntk/cond/<term>`` (``λ_1/λ_k``: how much slower the ``k``-th direction
    trains), ``ntk/effective_rank/<term>`` (``Tr K_ii/λ_1``), ``ntk/top_k_fraction/<term>`` and, for a
    TensorBoard logger, the histogram ``ntk/eig_hist/<term>``. Other ranks do nothing (no collective).

    Spectra cost more than traces (an exact eigendecomposition up to 2,048 rows per block, Lanczos
    above), so this is a separate callback with its own, usually much longer, period; it never
    changes the weights. Use it with or without :class:`~lightning_ntk.NTKWeightingCallback`.
    Override :meth:`should_update` to change the schedule.

    Example::

        import lightning.pytorch as pl
        from lightning_ntk import NTKSpectrumMonitor, NTKWeightingCallback

        trainer = pl.Trainer(callbacks=[NTKWeightingCallback(100), NTKSpectrumMonitor(every_n_steps=1000, k=5)])
        trainer.fit(model, datamodule)   # model: a PINNModule
        monitor.last_spectra["pde"].eigenvalues

    Args:
        every_n_steps: Compute the spectra every this many optimizer steps (step 0 included).
        k: Eigenvalues per block (capped at the block's rows).
        method: ``"exact"``, ``"lanczos"`` or ``"auto"`` (see :func:`lightning_ntk.ntk_eigenvalues`).
        seed: Seeds the Lanczos start vectors.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        k: int = 5,
        method: Literal["auto", "exact", "lanczos"] = "auto",
        seed: int = 0,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MisconfigurationException(f"`{name}` must be a positive int, got {value!r}.")
        if method not in ("auto", "exact", "lanczos"):
            raise MisconfigurationException(f"`method` must be 'auto', 'exact' or 'lanczos', got {method!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MisconfigurationException(f"`seed` must be an int, got {seed!r}.")
        self.every_n_steps = every_n_steps
        self.k = k
        self.method = method
        self.seed = seed
        self.last_spectra: dict[str, Spectrum] = {}
        self._last_step = -1
        self.rng = CallbackGenerator(seed, per_rank=False)
        self._warned_no_tensorboard = False

    def should_update(self, step: int) -> bool:
        """Whether to compute the spectra before optimizer step ``step`` (zero-based)."""
        return step % self.every_n_steps == 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks that the module follows the :class:`~lightning_ntk.PINNModule` contract."""
        require_pinn_module(pl_module, type(self).__name__)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Creates the Lanczos generator on the module's device."""
        self.rng.start(pl_module.device)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Computes and logs the spectra before the forward pass of a due optimizer step (rank zero)."""
        step = trainer.global_step
        if step == self._last_step or not self.should_update(step):
            return
        self._last_step = step
        if trainer.is_global_zero:
            self.log_spectra(trainer, pl_module, batch)

    def log_spectra(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, Spectrum]:
        """Computes the spectra of every block on ``batch`` and writes them to every logger."""
        self.last_spectra = block_spectra(pl_module, batch, self.k, self.method, generator=self.rng.generator)
        metrics: dict[str, float] = {}
        for name, spec in self.last_spectra.items():
            for j, value in enumerate(spec.eigenvalues.tolist(), start=1):
                metrics[f"{tags.scalar(tags.EIGENVALUE, name)}/{j}"] = value
            metrics[tags.scalar(tags.CONDITION, name)] = float(spec.condition_ratio)
            metrics[tags.scalar(tags.EFFECTIVE_RANK, name)] = float(spec.effective_rank)
            metrics[tags.scalar(tags.TOP_K_FRACTION, name)] = float(spec.top_k_fraction)
            shown = add_histogram(
                trainer, tags.scalar(tags.EIGENVALUE_HISTOGRAM, name), spec.eigenvalues, trainer.global_step
            )
            if not shown and trainer.loggers and not self._warned_no_tensorboard:
                rank_zero_warn(
                    "NTKSpectrumMonitor: eigenvalue histograms need a TensorBoardLogger; the other loggers "
                    "get the eigenvalues as scalars only."
                )
                self._warned_no_tensorboard = True
        log_metrics(trainer, metrics)
        return self.last_spectra

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "generator_state": self.rng.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self.rng.load_state_dict(state_dict.get("generator_state"))

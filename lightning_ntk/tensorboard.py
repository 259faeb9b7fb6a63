"""TensorBoard-specific output: the custom-scalars layout and eigenvalue histograms.

Everything here goes through ``trainer.loggers`` and touches only :class:`TensorBoardLogger`
instances on global rank zero; other loggers get the plain scalars from the callback.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

__all__ = ["add_histogram", "custom_scalars_layout", "tensorboard_writers", "write_layout"]


def tensorboard_writers(trainer: pl.Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger, on global rank zero only."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def custom_scalars_layout(terms: Sequence[str]) -> dict:
    """Charts grouping weights, traces and losses of all terms, and each term's eigenvalues."""
    layout = {
        "lightning_ntk": {
            "weights": ["Multiline", [f"ntk/weight/{t}" for t in terms]],
            "traces": ["Multiline", [f"ntk/trace/{t}" for t in terms]],
            "trace standard errors": ["Multiline", [f"ntk/trace_stderr/{t}" for t in terms]],
            "term losses": ["Multiline", [f"loss/{t}" for t in terms]],
            "residual time average": ["Multiline", ["ntk/residual_time_avg"]],
        }
    }
    for t in terms:
        layout[f"lightning_ntk term {t}"] = {
            "top eigenvalues": ["Multiline", [rf"ntk/eig/{t}/\d+"]],
            "condition ratio and effective rank": ["Multiline", [f"ntk/cond/{t}", f"ntk/effective_rank/{t}"]],
            "trace and weight": ["Multiline", [f"ntk/trace/{t}", f"ntk/weight/{t}"]],
        }
    return layout


def write_layout(trainer: pl.Trainer, terms: Sequence[str]) -> None:
    for writer in tensorboard_writers(trainer):
        writer.add_custom_scalars(custom_scalars_layout(terms))


def add_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> bool:
    """Write a histogram to every TensorBoard logger; ``False`` when there is none."""
    writers = tensorboard_writers(trainer)
    for writer in writers:
        writer.add_histogram(tag, values.detach().float().cpu(), step)
    return bool(writers)

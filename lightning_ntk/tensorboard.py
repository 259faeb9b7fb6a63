"""TensorBoard-specific output: the custom-scalars layout and eigenvalue histograms.

Everything here goes through ``trainer.loggers`` and touches only :class:`TensorBoardLogger`
instances on global rank zero; other loggers get the plain scalars from the callback.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_ntk import tags

__all__ = ["add_histogram", "custom_scalars_layout", "tensorboard_writers", "write_layout"]


def tensorboard_writers(trainer: pl.Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger, on global rank zero only."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def custom_scalars_layout(terms: Sequence[str]) -> dict:
    """Charts grouping weights, measured values (traces or gradient norms) and losses of all terms,
    and each term's eigenvalues."""
    measures = (tags.TRACE, tags.GRAD_NORM)
    measured = [tags.scalar(m, t) for m in measures for t in terms]
    errors = [tags.stderr(m, t) for m in measures for t in terms]
    layout = {
        "lightning_ntk": {
            "weights": ["Multiline", [tags.scalar(tags.WEIGHT, t) for t in terms]],
            "traces": ["Multiline", measured],
            "trace standard errors": ["Multiline", errors],
            "term losses": ["Multiline", [tags.scalar(tags.LOSS, t) for t in terms]],
            "residual time average": ["Multiline", [tags.RESIDUAL_TIME_AVERAGE]],
        }
    }
    for t in terms:
        layout[f"lightning_ntk term {t}"] = {
            "top eigenvalues": ["Multiline", [rf"{tags.scalar(tags.EIGENVALUE, t)}/\d+"]],
            "condition ratio and effective rank": [
                "Multiline",
                [tags.scalar(tags.CONDITION, t), tags.scalar(tags.EFFECTIVE_RANK, t)],
            ],
            "trace and weight": [
                "Multiline",
                [tags.scalar(tags.TRACE, t), tags.scalar(tags.GRAD_NORM, t), tags.scalar(tags.WEIGHT, t)],
            ],
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

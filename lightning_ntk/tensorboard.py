"""What the callbacks write to the loggers: plain scalars to every logger (:func:`log_metrics`, on the steps
:func:`due` names), and TensorBoard-specific output (the custom-scalars layout, histograms, images).

The TensorBoard output touches only :class:`TensorBoardLogger` instances on global rank zero; other loggers
get the plain scalars.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from lightning_ntk import tags

__all__ = [
    "add_chunk_profile",
    "add_density_image",
    "add_histogram",
    "custom_scalars_layout",
    "due",
    "log_metrics",
    "tensorboard_writers",
    "write_custom_scalars",
]


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """``metrics`` to every logger at the trainer's optimizer step, straight (as ``LearningRateMonitor`` does):
    a callback's values are recorded at the step they belong to, not buffered by ``self.log``."""
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)


def due(trainer: pl.Trainer, last_logged_step: int) -> bool:
    """Whether a callback that last logged at ``last_logged_step`` (``-1``: never) logs at this optimizer step:
    at least ``log_every_n_steps`` optimizer steps later (micro-batches of gradient accumulation share a step,
    so they log once)."""
    return last_logged_step < 0 or trainer.global_step - last_logged_step >= max(1, trainer.log_every_n_steps)


def tensorboard_writers(trainer: pl.Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger, on global rank zero only."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def custom_scalars_layout(terms: Sequence[str], causal: Sequence[str] = ()) -> dict:
    """Charts grouping weights, measured values (traces or gradient norms) and losses of all terms,
    each term's eigenvalues, and the smallest causal weight and ε of the ``causal`` terms."""
    measures = (tags.TRACE, tags.GRAD_NORM)
    measured = [tags.scalar(m, t) for m in measures for t in terms]
    errors = [tags.stderr(m, t) for m in measures for t in terms]
    layout = {
        "lightning_ntk": {
            "weights": ["Multiline", [tags.scalar(tags.WEIGHT, t) for t in terms]],
            "traces": ["Multiline", measured],
            "trace standard errors": ["Multiline", errors],
            "term losses": ["Multiline", [tags.scalar(tags.LOSS, t) for t in terms]],
            "loss time average": ["Multiline", [tags.LOSS_TIME_AVERAGE]],
        }
    }
    if causal:
        layout["lightning_ntk"]["smallest causal weight"] = [
            "Multiline",
            [tags.scalar(tags.CAUSAL_MIN_WEIGHT, t) for t in causal],
        ]
        layout["lightning_ntk"]["causal epsilon"] = ["Multiline", [tags.scalar(tags.CAUSAL_EPSILON, t) for t in causal]]
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


def write_custom_scalars(trainer: pl.Trainer, terms: Sequence[str], causal: Sequence[str] = ()) -> None:
    for writer in tensorboard_writers(trainer):
        writer.add_custom_scalars(custom_scalars_layout(terms, causal))


def add_histogram(trainer: pl.Trainer, tag: str, values: Tensor, step: int) -> bool:
    """Write a histogram to every TensorBoard logger; ``False`` when there is none."""
    writers = tensorboard_writers(trainer)
    for writer in writers:
        writer.add_histogram(tag, values.detach().float().cpu(), step)
    return bool(writers)


def add_chunk_profile(trainer: pl.Trainer, tag: str, weights: Tensor, t_range: tuple[float, float], step: int) -> bool:
    """Write per-chunk values as a TensorBoard histogram whose buckets are the time chunks: the
    histogram dashboard then shows the weight over time, one curve per step. ``False`` without a
    TensorBoard logger."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return False
    values = weights.detach().double().cpu()
    edges = torch.linspace(t_range[0], t_range[1], values.numel() + 1, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    for writer in writers:
        writer.add_histogram_raw(
            tag,
            min=float(edges[0]),
            max=float(edges[-1]),
            num=float(values.sum()),
            sum=float((values * centers).sum()),
            sum_squares=float((values * centers.square()).sum()),
            bucket_limits=edges[1:].tolist(),
            bucket_counts=values.tolist(),
            global_step=step,
        )
    return True


def add_density_image(
    trainer: pl.Trainer, tag: str, points: Tensor, density: Tensor, step: int, bins: int = 64
) -> bool:
    """Write where points are drawn as a grey image: the density over a pool of ``(P, d)`` points binned
    on the first two columns (x to the right, the second column upward), brightness ∝ √density. ``False``
    without a TensorBoard logger."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return False
    cols = points.detach()[:, :2].double().cpu()
    if cols.shape[1] == 1:
        cols = torch.cat([cols, torch.zeros_like(cols)], 1)
    hist = torch.histogramdd(cols, bins=[bins, bins], weight=density.detach().double().cpu()).hist
    # √ so that the uniform share stays visible beside a few dense spots.
    image = (hist / hist.max().clamp_min(1e-300)).sqrt().T.flip(0).unsqueeze(0).float()
    for writer in writers:
        writer.add_image(tag, image, step, dataformats="CHW")
    return True

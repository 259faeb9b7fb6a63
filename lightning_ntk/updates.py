"""``UpdateRecord``: what one weight update measured and set, reduced over ranks, in term order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ntk import tags

__all__ = ["UpdateRecord"]


@dataclass(frozen=True)
class UpdateRecord:
    """What one update of :class:`~lightning_ntk.NTKWeightingCallback` measured and set.

    Attributes:
        names: The terms, in the order of the tensors.
        measure: What was measured (``tags.TRACE`` or ``tags.GRAD_NORM``): the tag prefix.
        values: The measured (and averaged) values, ``(T,)``.
        stderr: Their standard errors, ``(T,)``.
        weights: The weights computed from them, ``(T,)``.

    Example:
        >>> values, weights = torch.tensor([1.0, 3.0]), torch.tensor([4.0, 1.3])
        >>> record = UpdateRecord(("bc", "pde"), "ntk/trace", values, torch.zeros(2), weights)
        >>> record.metrics()["ntk/weight/bc"], record.as_dict(record.values)
        (4.0, {'bc': 1.0, 'pde': 3.0})
    """

    names: tuple[str, ...]
    measure: str
    values: Tensor
    stderr: Tensor
    weights: Tensor

    def as_dict(self, values: Tensor) -> dict[str, float]:
        """``{term: value}`` of one of the tensors, read to the host."""
        return dict(zip(self.names, values.tolist(), strict=True))

    def metrics(self) -> dict[str, float]:
        """Every logged scalar (value, standard error, weight of each term), read to the host in one transfer."""
        values, stderr, weights = torch.stack([self.values, self.stderr, self.weights]).tolist()
        metrics = {}
        for name, v, e, w in zip(self.names, values, stderr, weights, strict=True):
            metrics[tags.scalar(self.measure, name)] = v
            metrics[tags.stderr(self.measure, name)] = e
            metrics[tags.scalar(tags.WEIGHT, name)] = w
        return metrics

"""``RelativeL2Error``: ‖u − u*‖₂ / ‖u*‖₂ over everything seen, as a torchmetrics ``Metric``."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["RelativeL2Error"]


class RelativeL2Error(Metric):
    r"""Relative L² error ``‖pred − target‖₂ / ‖target‖₂`` accumulated over batches.

    The states are the two sums of squares, reduced by summation, so the value over several
    batches (or DDP ranks) is that of the concatenated data, not a mean of per-batch ratios.

    Example:
        >>> metric = RelativeL2Error()
        >>> metric.update(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        >>> metric.update(torch.tensor([0.0]), torch.tensor([2.0]))
        >>> metric.compute()  # sqrt((0 + 1 + 4) / (1 + 1 + 4))
        tensor(0.9129)
    """

    is_differentiable = True
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_squared_error", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_squared_target", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"`preds` has shape {tuple(preds.shape)} but `target` has {tuple(target.shape)}.")
        # float64 sums: many small squares must not be lost against a large running total.
        self.sum_squared_error += (preds.double() - target.double()).square().sum()
        self.sum_squared_target += target.double().square().sum()

    def compute(self) -> Tensor:
        if float(self.sum_squared_target) == 0.0:
            raise ValueError("RelativeL2Error is undefined: the target seen so far is zero.")
        return (self.sum_squared_error / self.sum_squared_target).sqrt().float()

"""``StepLosses``: what one training step of a ``PINNModule`` computes on a batch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["StepLosses"]


@dataclass(frozen=True)
class StepLosses:
    """The total ``Σ_i w_i L_i`` (with its graph), each term's ``L_i``, and the chunk weights of every
    causal term (detached), as :meth:`~lightning_ntk.PINNModule.step_losses` returns them."""

    total: Tensor
    losses: dict[str, Tensor]
    causal_weights: dict[str, Tensor]

"""``PointWeights``: the importance weights of a training batch's points, one device buffer per term.

A sampler that draws a term's points from a density ``p`` (:class:`~lightning_ntk.AdaptiveCollocation`)
writes ``ω_n = u(x_n)/p(x_n)`` here each step. They are written in place (a new buffer only when a term's
point count, dtype or device changes), so a computation replayed from a CUDA graph, which reads memory
where it was at capture, reads each step's weights, as it reads the term weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

__all__ = ["PointWeights"]


class PointWeights:
    """One buffer per term, written in place; ``in_loss`` says whether they also enter the training loss.

    Example:
        >>> import torch
        >>> weights = PointWeights(["bc", "pde"])
        >>> weights.write({"pde": torch.tensor([1.0, 2.0])})
        >>> buffer = weights.buffers["pde"]
        >>> weights.write({"pde": torch.tensor([3.0, 4.0])})
        >>> weights.buffers["pde"] is buffer, buffer.tolist()
        (True, [3.0, 4.0])
    """

    def __init__(self, terms: Sequence[str]) -> None:
        self.terms = tuple(terms)
        self.buffers: dict[str, Tensor] = {}
        self.in_loss = True

    def write(self, weights: Mapping[str, Tensor], in_loss: bool = True) -> None:
        """Write ``{term: (N_i,) tensor}`` into the terms' buffers."""
        unknown = [name for name in weights if name not in self.terms]
        if unknown:
            raise ValueError(f"Point weights name unknown term(s) {unknown}; declared terms: {list(self.terms)}.")
        for name, omega in weights.items():
            if not isinstance(omega, Tensor) or omega.ndim != 1:
                raise ValueError(f"Point weights of term {name!r} must be a 1-D tensor (one per point).")
        for name, omega in weights.items():
            buffer = self.buffers.get(name)
            if buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (
                omega.shape,
                omega.dtype,
                omega.device,
            ):
                buffer.copy_(omega.detach())
            else:
                self.buffers[name] = omega.detach().clone()
        self.in_loss = bool(in_loss)

    def clear(self) -> None:
        """Forget every term's buffer."""
        self.buffers = {}

    def for_loss(self, training: bool) -> dict[str, Tensor]:
        """The weights the training loss applies: with ``in_loss``, in training mode only."""
        return self.buffers if self.in_loss and training else {}

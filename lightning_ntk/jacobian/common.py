"""What the exact paths share: their result, the reason a path does not apply, and small helpers.

Every path module (:mod:`~lightning_ntk.jacobian.gram`, :mod:`~lightning_ntk.jacobian.vmap`,
:mod:`~lightning_ntk.jacobian.loop`, :mod:`~lightning_ntk.jacobian.rows`) imports from here and
from no other path; :mod:`~lightning_ntk.jacobian.dispatch` tries them in order.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_ntk.tolerances import close

if TYPE_CHECKING:
    from lightning_ntk.points import PointSplit

__all__ = [
    "GroupJob",
    "NotPointwise",
    "PathUnavailable",
    "PointNorms",
    "Skipped",
    "check_point_values",
    "default_chunk_size",
    "first_sentence",
    "point_ids",
    "reports_skips",
    "row_norms",
    "select",
]

# Per-chunk budget for per-point Jacobian rows when `chunk_size` is not given. On CPU small chunks
# that stay in cache win (3x256 MLP, N=4096: 6.3 s with 16 points per chunk, 19 s with 256); on GPU
# large chunks keep the device busy.
_CPU_CHUNK_BYTES = 1 << 23
_GPU_CHUNK_BYTES = 1 << 30


@dataclass(frozen=True)
class PointNorms:
    """Squared Jacobian norms per point for every term.

    Attributes:
        norms: term → tensor ``(N_i,)`` of ``Σ_rows-of-point ‖∂r/∂θ‖²``.
        num_rows: term → number of residual entries (rows of ``J_i``).
        paths: term → ``"gram"``, ``"vmap"``, ``"loop"`` or ``"rows"``.
    """

    norms: dict[str, Tensor]
    num_rows: dict[str, int]
    paths: dict[str, str]


@dataclass(frozen=True)
class Skipped:
    """A path that does not apply to these terms, and why.

    ``retry``: the same path may still apply with the other groups' points left whole (the first try
    cuts them to one row, which a residual that reads them as a whole does not survive).
    """

    reason: str
    retry: bool = False


class PathUnavailable(ValueError):
    """None of the exact paths the caller allowed applies to this module and batch."""


class NotPointwise(Exception):
    """The per-point evaluation does not reproduce the full-batch residual."""


def check_point_values(name: str, got: Tensor, want: Tensor) -> None:
    """Raise :class:`NotPointwise` unless per-point values equal the full-batch residual's rows."""
    if not close(got, want):
        raise NotPointwise(f"per-point values of term {name!r} differ from the full-batch residual")


def select(values: Tensor, index: Tensor | None) -> Tensor:
    return values if index is None else values[index.to(values.device)]


def point_ids(size: int, index: Tensor | None) -> list[int]:
    return list(range(size)) if index is None else index.tolist()


def default_chunk_size(num_params: int, rows_per_point: int, itemsize: int, device: torch.device) -> int:
    budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    return max(1, budget // (num_params * max(rows_per_point, 1) * itemsize))


def row_norms(rows: Tensor, params: list[Tensor]) -> Tensor:
    """``Σ_k ‖∂rows[k]/∂θ‖²``, one backward per entry."""
    total = rows.new_zeros(())
    if not rows.requires_grad:
        return total
    for k in range(rows.numel()):
        grads = torch.autograd.grad(rows[k], params, retain_graph=True, allow_unused=True)
        for g in grads:
            if g is not None:
                total = total + g.square().sum()
    return total


def first_sentence(text: str) -> str:
    """The first sentence (or line) of an error message, whole: never cut mid-sentence.

    Example:
        >>> first_sentence("RuntimeError: vmap cannot call Tensor.item(). Use torch.where instead.")
        'RuntimeError: vmap cannot call Tensor.item().'
    """
    line = text.strip().splitlines()[0] if text.strip() else ""
    match = re.search(r"(?<=[\w)\]'\"])\.\s+(?=[A-Z])", line)
    return line[: match.start() + 1] if match else line


def reports_skips(
    path: str, *, retry_other_errors: bool
) -> Callable[[Callable[..., dict]], Callable[..., dict | Skipped]]:
    """Turn a path function into one that returns :class:`Skipped` instead of raising.

    A path evaluates the residual on batches the package cut from the caller's, which the full batch
    has already survived: any error there means the path does not apply (a term that slices the
    point tensor, ``torch.func`` refusing the residual), never the residual's own error.
    :class:`NotPointwise` may pass with the other groups' points left whole, so it is retried;
    ``retry_other_errors`` says whether other errors are retried too (not for ``torch.func``'s refusal,
    which cutting fewer points does not cure).
    """

    def decorate(fn: Callable[..., dict]) -> Callable[..., dict | Skipped]:
        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> dict | Skipped:
            try:
                return fn(*args, **kwargs)
            except NotPointwise as err:
                return Skipped(f"{path}: {err}", retry=True)
            except Exception as err:
                reason = first_sentence(f"{type(err).__name__}: {err}")
                return Skipped(f"{path}: the residual fails on a batch of single points ({reason})", retry_other_errors)

        return wrapper

    return decorate


@dataclass(frozen=True)
class GroupJob:
    """What a per-point path computes: the norms of one group of terms that share their points.

    Attributes:
        split: The batch, split by point.
        group: The terms of the group.
        reference: The full-batch residuals.
        params: The trainable parameters by name.
        chunk: Points per vectorized chunk.
        index: The subset of points to compute (``None``: all).
        shrink: Cut the other groups' points to one row (the first try).
    """

    split: PointSplit
    group: list[str]
    reference: Mapping[str, Tensor]
    params: Mapping[str, Tensor]
    chunk: int
    index: Tensor | None
    shrink: bool

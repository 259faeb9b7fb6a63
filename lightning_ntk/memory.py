"""What the package learns about a module once and reuses: one :class:`ModuleMemory` per module.

Exact traces decide once per module and batch signature which terms the Gram path covers
(:mod:`lightning_ntk.jacobian.dispatch`) and where the points sit in its recorded uses
(:mod:`lightning_ntk.jacobian.gram`); point subsampling checks once which tensors of a batch hold
each term's points (:mod:`lightning_ntk.points`). All of it is kept in the module's memory, keyed by
the batch's signature (shapes, dtypes, devices), and dies with the module. A resumed run starts with
a fresh memory and decides the same things again, without random draws that would shift a run.

Example:
    >>> import torch
    >>> net = torch.nn.Linear(1, 1)
    >>> memory_of(net) is memory_of(net)
    True
    >>> forget()
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # the Gram path imports this module; a runtime import would be a circle
    from lightning_ntk.jacobian.gram.layouts import GramEntry

__all__ = ["ExactPathEntry", "ModuleMemory", "first_time", "forget", "memory_of"]


@dataclass
class ExactPathEntry:
    """What exact traces decided for one module and batch signature.

    Attributes:
        refused: Why the Gram recording fails for every term (then every term takes a per-point
            path), or ``None``.
        off_gram: The terms that take a per-point path, each with the reason (rows that mix points, a
            failed cross-check).
        gram: The Gram path's confirmed layouts (:class:`~lightning_ntk.jacobian.gram.GramEntry`);
            ``None`` until a batch with finite residuals confirmed them.
        checked: Whether the Gram norms were cross-checked against a per-point path.
    """

    refused: str | None = None
    off_gram: dict[str, str] = field(default_factory=dict)
    gram: GramEntry | None = None  # stored by jacobian.dispatch after each Gram call
    checked: bool = False


@dataclass
class ModuleMemory:
    """Everything decided once for one module, per batch signature.

    Attributes:
        exact: One :class:`ExactPathEntry` per batch signature (a large batch taken in slices has one
            for the whole batch and one for each slice layout).
        point_counts: Point count of every term for subsampling, or ``None`` when the residuals are
            not pointwise.
    """

    exact: dict[tuple, ExactPathEntry] = field(default_factory=dict)
    point_counts: dict[tuple, dict[str, int] | None] = field(default_factory=dict)


_MEMORIES: weakref.WeakKeyDictionary[nn.Module, ModuleMemory] = weakref.WeakKeyDictionary()
_SAID: set[tuple] = set()


def memory_of(module: nn.Module) -> ModuleMemory:
    """The memory of ``module`` (made empty the first time)."""
    memory = _MEMORIES.get(module)
    if memory is None:
        memory = _MEMORIES[module] = ModuleMemory()
    return memory


def first_time(key: tuple) -> bool:
    """``True`` the first time ``key`` is seen in this process (for one-time messages), else ``False``."""
    if key in _SAID:
        return False
    _SAID.add(key)
    return True


def forget() -> None:
    """Forget everything learned about every module, and which one-time messages were given."""
    _MEMORIES.clear()
    _SAID.clear()

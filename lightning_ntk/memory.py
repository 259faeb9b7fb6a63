"""What the package learns about a module once and reuses: one :class:`ModuleMemory` per module.

Exact traces decide once per module and batch layout which terms the Gram path covers
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
from typing import Any

from torch import nn

__all__ = ["ModuleMemory", "first_time", "forget", "memory_of"]


@dataclass
class ModuleMemory:
    """Everything decided once for one module, per batch signature.

    Attributes:
        gram_verdicts: ``{term: reason}`` for the terms the Gram path does not cover (``{}``: it covers
            them all), or one reason for every term when the shared recording itself fails.
        gram_layouts: The Gram path's confirmed layouts (:class:`~lightning_ntk.jacobian.gram.ConfirmedLayouts`).
        point_layouts: Point count of every term for subsampling, or ``None`` when the residuals are
            not pointwise.
    """

    gram_verdicts: dict[tuple, dict[str, str] | str] = field(default_factory=dict)
    gram_layouts: dict[tuple, Any] = field(default_factory=dict)
    point_layouts: dict[tuple, dict[str, int] | None] = field(default_factory=dict)


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

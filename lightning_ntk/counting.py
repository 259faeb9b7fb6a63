"""Cost that can be counted instead of timed: aten ops dispatched, host synchronisations, backward passes.

On a GPU every aten op is a kernel launch and every host read of a device value is a stall (and
illegal inside a CUDA graph), so these counts, taken on a CPU, say what a computation will cost
there; they are deterministic, so tests can hold them to a budget like any other number.

Example:
    >>> import torch
    >>> x = torch.ones(3, requires_grad=True)
    >>> with OpCounter() as ops, BackwardCounter() as backwards:
    ...     y = (2 * x).sum()
    ...     _ = torch.autograd.grad(y, x)
    ...     _ = float(y.detach())
    >>> ops.syncs, backwards.calls
    (1, 1)
"""

from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "BackwardCounter", "OpCounter"]

# aten ops that read a tensor's values on the host: each waits for the device.
SYNC_OPS = frozenset(
    {"_local_scalar_dense", "item", "is_nonzero", "allclose", "equal", "nonzero", "unique", "masked_select"}
)


class OpCounter(TorchDispatchMode):
    """Tallies every aten op dispatched while active, by name (``func.overloadpacket``).

    Attributes:
        ops: op name → number of calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """All ops dispatched."""
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        """Ops in :data:`SYNC_OPS` (host reads of tensor values)."""
        return sum(n for op, n in self.ops.items() if op in SYNC_OPS)


class BackwardCounter:
    """Counts ``torch.autograd.grad`` calls made while active from modules whose name starts with
    ``prefix`` (default: every caller), so a residual's own input derivatives can be told apart from
    the backward passes a package runs.

    Args:
        prefix: Module-name prefix of the callers to count, e.g. ``"lightning_ntk"``.
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.calls = 0
        self._original = None

    def __enter__(self) -> BackwardCounter:
        self._original = original = torch.autograd.grad

        def counted(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith(self.prefix):
                self.calls += 1
            return original(*args, **kwargs)

        torch.autograd.grad = counted
        return self

    def __exit__(self, *exc: object) -> None:
        torch.autograd.grad = self._original

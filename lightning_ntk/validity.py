"""``DeferredValidityCheck``: whether an update's values were usable, read after the GPU has computed them.

The callback decides on the device whether every measured value is finite and positive (the weights stay
the previous ones where not), so an update never waits for the GPU. The flag is copied to the host without
blocking, and read before the same step's optimizer step, when it is long computed. Only then, on the
failure path, is anything read on the host: which term, which residual rows, whether the parameters
themselves diverged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_ntk.contract import evaluate_residuals, nonfinite_rows
from lightning_ntk.estimators import TraceEstimate
from lightning_ntk.weights import check_values

__all__ = ["DeferredValidityCheck"]


def flag_to_host(flag: Tensor) -> tuple[Tensor, Any]:
    """``flag`` copied to host memory without waiting for it (pinned memory on a GPU), and the CUDA
    event after the copy: waiting on it waits for the update's kernels, not for later work."""
    if flag.device.type != "cuda":
        return flag.clone(), None
    host = torch.empty((), dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


@dataclass
class _Pending:
    """An update whose validity is not read yet, with what explaining and undoing it needs."""

    valid: tuple[Tensor, Any]
    step: int
    values: Tensor
    estimate: TraceEstimate
    module: nn.Module
    batch: Any
    undo: Callable[[], None]


class DeferredValidityCheck:
    """Holds at most one update's validity flag until :meth:`resolve` reads it.

    Args:
        on_nonfinite: ``"raise"`` an error naming the step and the term, or ``"skip"``: warn, call the
            update's ``undo`` and keep going (the previous weights were kept on the device already).

    Example::

        check = DeferredValidityCheck("raise")
        check.arm(valid=ok, step=step, values=values, estimate=estimate, module=module, batch=batch, undo=undo)
        ...
        check.resolve()  # before the optimizer step: raises if the values were not finite and positive
    """

    def __init__(self, on_nonfinite: Literal["raise", "skip"] = "raise") -> None:
        self.on_nonfinite = on_nonfinite
        self._pending: _Pending | None = None
        self._warned_diverged = False

    def arm(
        self,
        *,
        valid: Tensor,
        step: int,
        values: Tensor,
        estimate: TraceEstimate,
        module: nn.Module,
        batch: Any,
        undo: Callable[[], None],
    ) -> None:
        """Start copying the device flag ``valid`` to the host; ``undo`` reverts what the values touched."""
        self._pending = _Pending(flag_to_host(valid), step, values, estimate, module, batch, undo)

    def resolve(self) -> None:
        """Read the armed flag (by now computed) and act on a bad one; harmless to call again."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        flag, event = pending.valid
        if event is not None:
            event.synchronize()
        if bool(flag):
            return
        pending.undo()
        try:
            check_values(pending.values, pending.module.terms, pending.estimate.quantity)
        except (FloatingPointError, ValueError) as err:
            self._fail(err, pending)

    def _fail(self, err: Exception, pending: _Pending) -> None:
        diverged = nonfinite_parameters(pending.module)
        message = f"At optimizer step {pending.step}: {explain(err, pending.module, pending.batch, pending.estimate)}"
        if self.on_nonfinite == "raise":
            raise type(err)(message) from err
        if diverged and self._warned_diverged:
            return  # said once: the weights cannot come back while the model stays non-finite
        self._warned_diverged = bool(diverged)
        more = " Later steps skip without a warning while the parameters stay non-finite." if diverged else ""
        # Every rank sees the same reduced values, so every rank skips together.
        rank_zero_warn(f"{message} Keeping the previous weights (on_nonfinite='skip').{more}")


def explain(err: Exception, module: nn.Module, batch: Any, estimate: TraceEstimate) -> str:
    """The check's message, led by what is non-finite first: the parameters, or this rank's residuals."""
    if not isinstance(err, FloatingPointError):
        return str(err)
    diverged = nonfinite_parameters(module)
    if diverged:
        total = sum(1 for p in module.parameters() if p.requires_grad)
        return (
            f"the parameters of the model are not finite ({len(diverged)} of {total} tensors, first "
            f"{diverged[0]!r}): training diverged before this update, so no weight can repair it, and "
            f"every {estimate.quantity} is NaN. Lower the learning rate, clip gradients, or resume from an "
            "earlier checkpoint."
        )
    rows = nonfinite_rows(evaluate_residuals(module, batch, module.terms))
    if not rows:
        return f"{err} (The residuals on this rank are finite: the Jacobian or another rank's points are not.)"
    where = "; ".join(f"the residual of term {name!r} is {words}" for name, words in rows.items())
    return (
        f"{where}, so its {estimate.quantity} is not finite. Check the residual for NaN/Inf (division by "
        "zero, log of a negative, an exploding network, points outside the domain)."
    )


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of the trainable parameters holding NaN or Inf (read on the host: failure path only)."""
    return [name for name, p in module.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]

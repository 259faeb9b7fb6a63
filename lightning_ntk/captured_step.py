"""The whole PINN training step replayed from one CUDA graph: ``PINNModule(capture_step=True)``.

An eager PINN step on a GPU is launch-bound (a 3×256 network: 4.7 ms eager, ~1.3 ms as a graph;
the table in ``docs/guides/gpu.md``). With ``capture_step=True`` the module optimizes manually and replays
zero_grad, the residuals (with their ``create_graph`` input derivatives), the weighted loss, the
backward pass and the optimizer step as one graph per batch signature (:class:`~lightning_ntk.capture.CapturedCall`).

What changes between replays is read from device memory the graph points at, so everything that
steers training still acts: the term weights (the ``ntk_weights`` buffer, written in place by
:class:`~lightning_ntk.NTKWeightingCallback`), the causal ``ε`` (a device scalar refilled when the stage
moves) and the learning rate (a device tensor that LR schedulers fill in place; the module steps the
schedulers itself, as manual optimization requires). Logged losses come from the graph's static
outputs, outside it.

What cannot be replayed is refused when fitting starts, with what to change: gradient accumulation,
gradient clipping by the Trainer, more than one optimizer, mixed precision, ``ReduceLROnPlateau`` (it
needs a monitored metric), and on CUDA an optimizer other than Adam/AdamW (made ``capturable`` here).
A batch whose shape changes every step is captured once per shape and warned about.

On a CPU the same code runs every step eagerly (no graph), so a CPU test shows it trains bit for bit
like the ordinary module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_ntk.capture import CapturedCall, captured_state
from lightning_ntk.losses import StepLosses

__all__ = ["CapturedTrainingStep"]

_PRECISIONS = ("32-true", "32", "64-true", "64")


class CapturedTrainingStep:
    """The training step of one :class:`~lightning_ntk.PINNModule` with ``capture_step=True``.

    Args:
        module: The module (its trainer, optimizer, schedulers, ``terms`` and ``causal`` are read).
        step_losses: ``step_losses(batch)``: the step's :class:`~lightning_ntk.losses.StepLosses`, replayed.
        after_step: Called with the replay's :class:`~lightning_ntk.losses.StepLosses` (logging, causal ε).
        before_optimizer_step: Called before each replay, as automatic optimization calls
            ``on_before_optimizer_step`` (what callbacks registered with ``add_before_optimizer_step``).
    """

    def __init__(
        self,
        module: pl.LightningModule,
        step_losses: Callable[[Any], Any],
        after_step: Callable[[Any], None],
        before_optimizer_step: Callable[[], None],
    ) -> None:
        self.module = module
        self.step_losses = step_losses
        self.after_step = after_step
        self.before_optimizer_step = before_optimizer_step
        self.calls: dict[str, CapturedCall] = {}
        self._warned_shapes = False

    # ------------------------------------------------------------------ checks when fitting starts

    def prepare_for_replay(self) -> None:
        """Refuse what a replayed step cannot do, and on CUDA make the optimizer's parameter groups
        replayable (Adam/AdamW ``capturable=True`` with a device learning rate)."""
        module, trainer = self.module, self.module.trainer
        name = type(module).__name__
        if trainer.accumulate_grad_batches != 1:
            raise MisconfigurationException(
                f"{name}(capture_step=True) replays one optimizer step per batch, so it cannot accumulate "
                f"gradients (accumulate_grad_batches={trainer.accumulate_grad_batches}): use a larger batch "
                "or capture_step=False."
            )
        if trainer.gradient_clip_val is not None:
            raise MisconfigurationException(
                f"{name}(capture_step=True): Trainer(gradient_clip_val=...) clips by a norm read on the host "
                "between backward and step, inside the replayed graph. Remove it or use capture_step=False."
            )
        precision = str(trainer.precision)
        if precision not in _PRECISIONS:
            raise MisconfigurationException(
                f"{name}(capture_step=True) supports full precision only, got precision={precision!r}: use "
                "'32-true' or capture_step=False."
            )
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"{name}(capture_step=True) replays one optimizer; configure_optimizers returned "
                f"{len(optimizers)}. Return one, or use capture_step=False."
            )
        plateau = [c for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, ReduceLROnPlateau)]
        if plateau:
            raise MisconfigurationException(
                f"{name}(capture_step=True) steps its LR schedulers itself, and "
                f"{type(plateau[0].scheduler).__name__} needs a monitored metric that a replayed step does not "
                "produce. Use a schedule of the step count (ExponentialLR, StepLR, CosineAnnealingLR, ...) or "
                "capture_step=False."
            )
        if module.device.type == "cuda":
            optimizer = optimizers[0]
            if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                raise MisconfigurationException(
                    f"{name}(capture_step=True) on CUDA replays the optimizer step in a graph, which needs an "
                    f"optimizer with `capturable=True`; got {type(optimizer).__name__}. Use torch.optim.Adam "
                    "or AdamW, or capture_step=False."
                )
            for group in optimizer.param_groups:
                group["capturable"] = True
                group["foreach"] = False if group.get("foreach") is None else group["foreach"]
                if not isinstance(group["lr"], Tensor):
                    # A Python float would be baked into the graph; schedulers fill a tensor in place.
                    group["lr"] = torch.tensor(float(group["lr"]), device=module.device)

    # ------------------------------------------------------------------ every step

    def __call__(self, batch: Any) -> Tensor:
        module = self.module
        lightning_optimizer = module.optimizers()
        optimizer = getattr(lightning_optimizer, "optimizer", lightning_optimizer)
        # An update of this step's weights is judged before the parameters move.
        self.before_optimizer_step()
        leaves, spec = tree_flatten(batch)
        if not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError(
                f"{type(module).__name__}(capture_step=True) copies the batch into static tensors, so every "
                f"leaf of the batch must be a tensor; got {sorted({type(t).__name__ for t in leaves})}."
            )
        call = self._call_for(str(spec), spec, optimizer)
        # LightningOptimizer.step() would run the step eagerly; its two private hooks are what it does around
        # the step (the strategy's step counters and profiler marks), so the replay keeps Lightning's
        # bookkeeping (trainer.global_step advances) without a public way to wrap a replayed step.
        lightning_optimizer._on_before_step()
        outputs = call(*leaves)
        lightning_optimizer._on_after_step()
        total, losses, causal = outputs[0], outputs[1], outputs[2:]
        losses = dict(zip(module.terms, losses.unbind(0), strict=True))
        self.after_step(StepLosses(total, losses, dict(zip(module.causal, causal, strict=True))))
        self._step_schedulers()
        return total

    def _call_for(self, key: str, spec: Any, optimizer: torch.optim.Optimizer) -> CapturedCall:
        call = self.calls.get(key)
        if call is not None:
            self._warn_if_shapes_change(call)
            return call
        module = self.module

        def step(*tensors: Tensor) -> tuple[Tensor, ...]:
            batch = tree_unflatten(list(tensors), spec)
            optimizer.zero_grad(set_to_none=False)  # the gradients stay the graph's static memory
            step = self.step_losses(batch)
            step.total.backward()
            optimizer.step()
            stacked = torch.stack([step.losses[name].detach() for name in module.terms])
            return (step.total.detach(), stacked, *(step.causal_weights[name] for name in module.causal))

        call = self.calls[key] = CapturedCall(
            step,
            state=lambda: captured_state(module),
            snapshot=lambda: _snapshot(module, optimizer),
            name="the captured training step",
        )
        return call

    def _warn_if_shapes_change(self, call: CapturedCall) -> None:
        if len(call.entries) > 4 and not self._warned_shapes:
            self._warned_shapes = True
            warnings.warn(
                f"{type(self.module).__name__}(capture_step=True): the batch has had {len(call.entries)} "
                "shapes; each new shape costs a capture. Use batches of one shape, or capture_step=False.",
                stacklevel=4,
            )

    def _step_schedulers(self) -> None:
        # Manual optimization leaves schedulers to the module; this matches what automatic
        # optimization does after each optimizer step (interval "step") and at epoch ends ("epoch").
        trainer = self.module.trainer
        step = trainer.global_step
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and step % config.frequency == 0:
                config.scheduler.step()

    def on_train_epoch_end(self) -> None:
        trainer = self.module.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval == "epoch" and (trainer.current_epoch + 1) % config.frequency == 0:
                config.scheduler.step()


def _snapshot(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """Save the values the step changes (parameters, gradients, optimizer state) and return what puts
    them back in place; optimizer state created after the snapshot is reset to Adam's initial zeros."""
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [(p, p.detach().clone()) for p in params]
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in params]
    state = {
        id(p): {k: v.detach().clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)} for p in params
    }

    @torch.no_grad()
    def restore() -> None:
        for p, value in saved:
            p.copy_(value)
        for p, grad in grads:
            if p.grad is not None:
                p.grad.zero_() if grad is None else p.grad.copy_(grad)
        for p in params:
            before = state[id(p)]
            for k, v in optimizer.state[p].items():
                if isinstance(v, Tensor):
                    v.copy_(before[k]) if k in before else v.zero_()

    return restore

"""``PINNModule``: a LightningModule whose loss is a weighted sum of named residual terms."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation
from torch import Tensor
from typing_extensions import override

from lightning_ntk import tags
from lightning_ntk.captured_step import CapturedTrainingStep
from lightning_ntk.causal import CausalWeighting, check_causal_terms
from lightning_ntk.contract import (
    check_residuals,
    check_term_weights,
    check_terms,
    explain_input_derivatives,
    fresh_tensors,
)
from lightning_ntk.losses import StepLosses
from lightning_ntk.ntk_view import NTKView, scale_rows
from lightning_ntk.point_weights import PointWeights
from lightning_ntk.tensorboard import add_chunk_profile

if TYPE_CHECKING:
    from lightning_ntk.gauss_newton_optimizer import NTKGaussNewton

__all__ = ["PINNModule", "StepLosses", "require_pinn_module"]


_CHECKPOINT_KEY = "lightning_ntk"


class PINNModule(pl.LightningModule):
    r"""Base class for models trained on a weighted sum of named loss terms.

    Subclasses declare their terms and implement :meth:`residuals`; the training loss is
    ``Σ_i w_i · L_i`` with ``L_i = mean(r_i**2)`` by default (override :meth:`term_loss`). The weights
    live in the persistent buffer ``ntk_weights`` (one entry per term, in declaration order), so they
    are saved in every ``state_dict`` and checkpoint and restored by ``load_from_checkpoint`` without
    any callback. :class:`~lightning_ntk.NTKWeightingCallback` updates them in place.

    **Causal weighting of time-dependent terms.** ``causal={"pde": CausalWeighting(time_column=1)}``
    splits that term's points into time chunks and makes its loss ``mean_k(w_k L_k)`` with
    ``w_k = exp(−ε Σ_{j<k} L_j)`` (Wang, Sankaran & Perdikaris 2024): later times train once earlier
    ones fit. Implement :meth:`residual_points` to say which points each causal term's rows belong to.
    :class:`~lightning_ntk.NTKWeightingCallback` then weights the term by its *causal* NTK trace,
    ``Σ_n s_n ‖∂r_n/∂θ‖²`` (JAX-PI's combination; :mod:`lightning_ntk.causal` derives it). Every
    training step logs ``causal/min_weight/<term>`` and ``causal/epsilon/<term>``, and at the log
    cadence the weights per chunk as the TensorBoard histogram ``causal/weights/<term>`` (x: time,
    height: weight). The ε stage is saved in checkpoints.

    Args:
        terms: Names of the loss terms, e.g. ``["bc", "pde"]``.
        init_weights: Starting weight of some or all terms (default 1.0 each).
        causal: ``{term: CausalWeighting(...)}`` for the time-dependent terms to weight causally.
        capture_step: Replay the whole training step (zero_grad, residuals, weighted loss, backward,
            optimizer step) from one CUDA graph per batch signature, with manual optimization
            (:mod:`lightning_ntk.captured_step`): on a GPU, a launch-bound step becomes one replay.
            Term weights, causal ``ε`` and the learning rate stay device tensors updated between
            replays; what cannot be replayed is refused when fitting starts. On a CPU the step runs
            eagerly and trains exactly like ``capture_step=False``.

    Example::

        from lightning_ntk import PINNModule
        from lightning_ntk.derivatives import partial

        class Poisson(PINNModule):
            def __init__(self):
                super().__init__(terms=["bc", "pde"])
                self.net = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

            def residuals(self, batch):
                x_b, x_r = batch
                return {"bc": self.net(x_b), "pde": partial(self.net, x_r, 0, 0) - f(x_r)}

            def configure_optimizers(self):
                return torch.optim.Adam(self.parameters(), lr=1e-3)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only plain methods: a staticmethod or a descriptor is left as the subclass wrote it.
        if inspect.isfunction(cls.__dict__.get("residuals")):
            cls.residuals = explain_input_derivatives(cls.__dict__["residuals"])

    def __init__(
        self,
        terms: Sequence[str],
        init_weights: Mapping[str, float] | None = None,
        causal: Mapping[str, CausalWeighting] | None = None,
        capture_step: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(capture_step, bool):
            raise TypeError(f"`capture_step` must be True or False, got {capture_step!r}.")
        self.capture_step = capture_step
        self.automatic_optimization = not capture_step
        self._captured_step = (
            CapturedTrainingStep(
                self,
                step_losses=self.step_losses,
                after_step=self._after_captured_step,
                before_optimizer_step=self._before_captured_optimizer_step,
            )
            if capture_step
            else None
        )
        self._terms = check_terms(terms)
        self.register_buffer("ntk_weights", torch.ones(len(self._terms)), persistent=True)
        if init_weights is not None:
            self.set_term_weights(init_weights)
        self._causal = check_causal_terms(causal, self._terms)
        self._point_weights = PointWeights(self._terms)
        # In a dict: a view (an nn.Module holding this module) set as an attribute would be a submodule.
        self._views: dict[str, NTKView] = {}
        self._before_optimizer_step: dict[object, Callable[[], None]] = {}
        self._gauss_newton: NTKGaussNewton | None = None  # set by NTKGaussNewton(self)

    @property
    def causal(self) -> dict[str, CausalWeighting]:
        """``{term: CausalWeighting}`` of the causally weighted terms (empty if none)."""
        return self._causal

    @property
    def terms(self) -> tuple[str, ...]:
        """The declared term names, in the order of ``ntk_weights``."""
        return self._terms

    @property
    def term_weights(self) -> dict[str, float]:
        """The current weight of every term (reads the buffer back to the host)."""
        return dict(zip(self._terms, self.ntk_weights.tolist(), strict=True))

    def set_term_weights(self, weights: Mapping[str, float] | Tensor) -> None:
        """Set the weights of some or all terms in place.

        Args:
            weights: ``{term: weight}`` for any subset of the terms, or a tensor with one entry per
                term in declaration order. Every weight must be finite and positive.
        """
        if isinstance(weights, Tensor):
            if weights.shape != self.ntk_weights.shape:
                raise ValueError(
                    f"Weight tensor has shape {tuple(weights.shape)}, expected ({len(self._terms)},) "
                    f"for terms {list(self._terms)}."
                )
            with torch.no_grad():
                self.ntk_weights.copy_(weights)
            return
        with torch.no_grad():
            for name, value in check_term_weights(weights, self._terms).items():
                self.ntk_weights[self._terms.index(name)] = value

    @property
    def point_weights(self) -> dict[str, Tensor]:
        """``{term: ω}``: importance weights of the training batch's points, one device buffer per term (empty
        unless a sampler set them)."""
        return self._point_weights.buffers

    def set_point_weights(self, weights: Mapping[str, Tensor] | None, in_loss: bool = True) -> None:
        """Importance weights ``ω_n = u(x_n)/p(x_n)`` of the points of this step's training batch, per term.

        Set by :class:`~lightning_ntk.AdaptiveCollocation` when it draws a term's points from a density
        ``p`` instead of uniformly. They always enter the term's NTK trace (``Σ_n ω_n K_nn``, the
        uniform-measure trace that the weight rules assume); with ``in_loss`` they also enter its training
        loss (``mean(ω r²)``, and the self-normalised chunk losses of a causal term), which makes the loss an
        unbiased estimate of the uniform one. They apply in training mode only (validation sees none).

        Each term's weights are written in place into one buffer per term (a new buffer only when the
        term's point count, dtype or device changes): a captured training step or captured traces read
        them where they live, as they read ``ntk_weights``, so every replay uses this step's weights.
        ``None`` forgets every term's buffer.

        Args:
            weights: ``{term: (N_i,) tensor}``, one weight per point of the term.
            in_loss: Apply them to the training loss too.
        """
        if weights is None:
            self._point_weights.clear()
        else:
            self._point_weights.write(weights, in_loss)

    def ntk_view(self, batch: Any) -> PINNModule | NTKView:
        """What NTK estimators measure on ``batch``: this module, or with causal terms or point weights the
        view of it (:class:`~lightning_ntk.ntk_view.NTKView`, frozen on ``batch``) whose causal
        residuals are scaled by the batch's causal weights and whose weighted points by ``√ω``, so every
        estimator takes the causal, uniform-measure trace. One view per module, kept: the exact path
        remembers its layouts per measured module."""
        if not self._causal and not self._point_weights.buffers:
            return self
        if "ntk" not in self._views:
            points = self.residual_points if self._causal else None
            self._views["ntk"] = NTKView(self, self._causal, points, self._current_point_weights)
        return self._views["ntk"].freeze(batch)

    def _current_point_weights(self) -> dict[str, Tensor]:
        return self._point_weights.buffers

    def residuals(self, batch: Any) -> Mapping[str, Tensor]:
        """Per-point predictor outputs, one tensor per declared term.

        Row ``n`` (``shape[0]``) belongs to point ``n``; shape ``(N_i,)`` or ``(N_i, d)``, and every
        entry is one row of the term's Jacobian ``J_i`` (more trailing dimensions, ``(N_i, d1, d2)``, are
        the point's ``d1·d2`` rows). A square ``(N, N)`` residual (from ``N`` points on) is refused: it is
        what broadcasting an ``(N, 1)`` tensor against an ``(N,)`` one makes. Return the *operator* applied to
        the network (``u_xx - f`` for a Poisson residual, ``u - g`` on the boundary), not the loss.

        Any style of input derivatives works and takes the same fast exact path (the Gram identities
        over the recorded parameter uses, about one to two training steps): ordinary
        ``torch.autograd.grad(..., create_graph=True)``, :mod:`lightning_ntk.derivatives`,
        ``torch.func``. Keep row ``n`` a function of point ``n`` only; a term whose rows mix points
        leaves the fast path alone (see "Bring your own PINN" in the docs).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `residuals(batch)`.")

    def residual_points(self, batch: Any) -> Mapping[str, Tensor]:
        """The points of every causal term: ``{term: (N_i, d)}``, row ``n`` the point of residual row ``n``.

        Needed only with ``causal``; time is the column that term's
        :class:`~lightning_ntk.CausalWeighting` names. Example: ``return {"pde": batch["pde"]}``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} weights {sorted(self._causal)} causally, so it must implement "
            "`residual_points(batch)` returning {term: (N, d) points} for those terms."
        )

    def term_loss(self, term: str, residual: Tensor) -> Tensor:
        """Loss of one term from its residual; ``mean(residual**2)`` unless overridden.

        A causal term's residual arrives scaled (``√s_n · r_n``, see :mod:`lightning_ntk.causal`), so the
        default gives its causal loss ``mean_k(w_k L_k)``.
        """
        return residual.square().mean()

    def weighted_loss(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """``(Σ_i w_i L_i, {term: L_i})`` on a batch.

        .. deprecated:: 0.1.0
            One name for one thing: use :meth:`step_losses` (``.total``, ``.losses``), which also carries the
            causal weights of the step. ``weighted_loss`` will be removed in a later release.
        """
        rank_zero_deprecation(
            "`PINNModule.weighted_loss(batch)` is deprecated: use `step_losses(batch)`, whose `.total` and `.losses` "
            "are the two values it returned."
        )
        step = self.step_losses(batch)
        return step.total, step.losses

    def step_losses(self, batch: Any) -> StepLosses:
        """The :class:`StepLosses` of ``batch``: what :meth:`training_step` (and a captured step) computes."""
        recording = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        residuals = check_residuals(self.residuals(batch), self._terms, require_grad=recording)
        causal_weights = {}
        omegas = self._point_weights.for_loss(self.training)
        for name, omega in omegas.items():
            if residuals[name].shape[0] != omega.shape[0]:
                raise ValueError(
                    f"Term {name!r} has point weights for {omega.shape[0]} points but its residual has "
                    f"{residuals[name].shape[0]} rows: the weights were set for another batch "
                    "(call `set_point_weights(None)` before evaluating other points)."
                )
            if name not in self._causal:
                residuals[name] = scale_rows(residuals[name], omega)
        if self._causal:
            points = self.residual_points(batch)
            for name, cw in self._causal.items():
                if name not in points:
                    raise ValueError(f"`residual_points(batch)` did not return the points of causal term {name!r}.")
                residuals[name], causal_weights[name] = cw.apply(residuals[name], points[name], omegas.get(name))
        losses = {name: self.term_loss(name, residuals[name]) for name in self._terms}
        stacked = torch.stack([losses[name] for name in self._terms])
        total = (self.ntk_weights.detach().to(stacked) * stacked).sum()
        return StepLosses(total, losses, causal_weights)

    @override
    def on_fit_start(self) -> None:
        # The Gauss–Newton optimizer this fit uses, if any: one left from an earlier fit (then Adam, say) must
        # not keep taking over the batch and skipping the backward.
        gauss_newton = [opt for opt in self.trainer.optimizers if type(opt).__name__ == "NTKGaussNewton"]
        self._gauss_newton = gauss_newton[0] if gauss_newton else None
        if self._gauss_newton is not None and self.trainer.world_size > 1:
            raise MisconfigurationException(
                "NTKGaussNewton does not support distributed training yet: each rank would solve with its own "
                "points and the replicas would drift apart. Train on one device (devices=1)."
            )
        if self._gauss_newton is not None and self.trainer.accumulate_grad_batches > 1:
            raise MisconfigurationException(
                "NTKGaussNewton steps on one batch (its rows make the whole NTK); accumulate_grad_batches="
                f"{self.trainer.accumulate_grad_batches} would step on the last micro-batch alone. Put the points "
                "in one batch and set accumulate_grad_batches=1."
            )
        if self._captured_step is not None:
            self._captured_step.prepare_for_replay()

    @override
    def on_train_epoch_end(self) -> None:
        if self._captured_step is not None:
            self._captured_step.on_train_epoch_end()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self._captured_step is not None:
            return self._captured_step(batch)
        step = self.step_losses(batch)
        self.log_step_losses(step)
        self.advance_causal_schedules(step.causal_weights)
        if self._gauss_newton is not None:
            self._gauss_newton.pending_batch = batch
        return step.total

    @override
    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        # NTKGaussNewton forms its step from the Jacobian rows, never from param.grad: the closure's backward
        # would be a wasted pass.
        if self._gauss_newton is None:
            super().backward(loss, *args, **kwargs)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        record = None if self._gauss_newton is None else self._gauss_newton.last
        if record is None:
            return
        metrics = record.metrics()
        bar = getattr(self._trainer, "progress_bar_callback", None) is not None
        self.log(tags.GN_DAMPING, metrics.pop(tags.GN_DAMPING), prog_bar=bar)
        self.log_dict(metrics)

    def add_before_optimizer_step(self, key: object, fn: Callable[[], None]) -> None:
        """Have a captured step (``capture_step=True``, manual optimization) call ``fn()`` before it
        replays the optimizer step, as automatic optimization calls ``on_before_optimizer_step``.
        :class:`~lightning_ntk.NTKWeightingCallback` registers its validity check here at ``setup``; one
        ``fn`` per ``key``."""
        self._before_optimizer_step[key] = fn

    def _after_captured_step(self, step: StepLosses) -> None:
        self.log_step_losses(step)
        self.advance_causal_schedules(step.causal_weights)

    def _before_captured_optimizer_step(self) -> None:
        for fn in self._before_optimizer_step.values():
            fn()

    def log_step_losses(self, step: StepLosses) -> None:
        """Log the step's total loss; per-term losses and causal statistics on the steps the logger writes.

        Each ``self.log`` costs Lightning ~0.3 ms of Python, more than a whole step of a small PINN, and
        Lightning hands on_step values to the logger only every ``log_every_n_steps``: values logged in
        between would be overwritten unread. The total is logged every step, for monitors
        (``ModelCheckpoint(monitor="loss/total")``), and shown in the progress bar only when there is one:
        Lightning reads progress-bar values on the host every step, a synchronisation on a GPU.
        """
        trainer = self._trainer
        bar = trainer is not None and getattr(trainer, "progress_bar_callback", None) is not None
        self.log(tags.scalar(tags.LOSS, "total"), step.total.detach(), prog_bar=bar)
        if not self._logger_writes_this_step():
            return
        self.log_dict({tags.scalar(tags.LOSS, name): loss.detach() for name, loss in step.losses.items()})
        for name, weights in step.causal_weights.items():
            cw = self._causal[name]
            self.log(tags.scalar(tags.CAUSAL_MIN_WEIGHT, name), weights.min())
            # A copy: the device ε moves on in place when the schedule advances.
            self.log(tags.scalar(tags.CAUSAL_EPSILON, name), cw.epsilon_like(weights).clone())
            if trainer is not None:
                add_chunk_profile(
                    trainer, tags.scalar(tags.CAUSAL_WEIGHTS, name), weights, cw.t_range, self.global_step
                )

    def advance_causal_schedules(self, causal_weights: Mapping[str, Tensor]) -> None:
        """Keep each causal term's chunk weights of this step and move its ε schedule on where every chunk
        is fitted, on the device (:meth:`~lightning_ntk.CausalWeighting.advance_on_device`)."""
        for name, weights in causal_weights.items():
            cw = self._causal[name]
            cw.advance_on_device(weights)

    def _logger_writes_this_step(self) -> bool:
        trainer = self._trainer
        # Lightning has no public "does the logger write this step" flag; its logger connector decides it for
        # self.log, so it is asked (and without one, every step counts as written).
        connector = getattr(trainer, "_logger_connector", None) if trainer is not None else None
        return bool(getattr(connector, "should_update_logs", True))

    def log_validation_losses(self, batch: Any) -> Tensor:
        """Log ``val/loss/<term>`` and ``val/loss/total`` of ``batch`` with the current weights.

        The base class defines no ``validation_step`` (Lightning would then announce a skipped
        validation loop in every fit without a ``val_dataloader``); call this from yours. It runs with
        autograd enabled on a copy of the batch, so residuals that take input derivatives with
        ``torch.autograd.grad`` work under ``Trainer(inference_mode=True)`` too, and it never changes
        the weights.

        Example::

            def validation_step(self, batch, batch_idx):
                return self.log_validation_losses(batch)
        """
        total, losses = self._evaluate_with_autograd(batch)
        self.log_dict({f"val/{tags.scalar(tags.LOSS, name)}": loss for name, loss in losses.items()}, batch_size=1)
        self.log(f"val/{tags.scalar(tags.LOSS, 'total')}", total, prog_bar=True, batch_size=1)
        return total

    @override
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Returns the residuals ``{term: tensor}`` of the batch (detached); override to predict the solution."""
        with torch.inference_mode(False), torch.enable_grad():
            residuals = check_residuals(self.residuals(fresh_tensors(batch)), self._terms, require_grad=False)
        return {name: r.detach() for name, r in residuals.items()}

    def _evaluate_with_autograd(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        # Tensors made under inference mode cannot enter an autograd graph: work on fresh copies.
        with torch.inference_mode(False), torch.enable_grad():
            step = self.step_losses(fresh_tensors(batch))
        return step.total.detach(), {name: loss.detach() for name, loss in step.losses.items()}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = {
            "terms": list(self._terms),
            "causal": {name: cw.state_dict() for name, cw in self._causal.items()},
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(_CHECKPOINT_KEY, {}).get("terms")
        if saved is not None and list(saved) != list(self._terms):
            raise ValueError(
                f"This checkpoint was written for terms {list(saved)}, but {type(self).__name__} declares "
                f"{list(self._terms)}. Declare the same terms (same names and order) to load it."
            )
        causal = checkpoint.get(_CHECKPOINT_KEY, {}).get("causal", {})
        if set(causal) != set(self._causal):
            raise ValueError(
                f"This checkpoint has causal weighting for terms {sorted(causal)}, but {type(self).__name__} "
                f"weights {sorted(self._causal)} causally. Configure the same `causal` terms to load it."
            )
        for name, state in causal.items():
            self._causal[name].load_state_dict(state)


def require_pinn_module(module: pl.LightningModule, user: str) -> None:
    """Raise a ``MisconfigurationException`` that says what to change unless ``module`` keeps the contract."""
    if not isinstance(module, PINNModule):
        raise MisconfigurationException(
            f"{user} needs a lightning_ntk.PINNModule, got {type(module).__name__}. "
            "Subclass PINNModule, declare `terms` and implement `residuals(batch)`."
        )
    if type(module).residuals is PINNModule.residuals:
        raise MisconfigurationException(
            f"{type(module).__name__} does not implement `residuals(batch)`; NTK traces need it."
        )
    if module.causal and type(module).residual_points is PINNModule.residual_points:
        raise MisconfigurationException(
            f"{type(module).__name__} weights {sorted(module.causal)} causally but does not implement "
            "`residual_points(batch)`; return {term: (N, d) points} for those terms."
        )

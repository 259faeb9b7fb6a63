"""``NTKGaussNewton``: the damped Gauss–Newton step as a ``torch.optim.Optimizer`` (Lightning-free).

Each step forms ``J``, ``r̃`` and ``K = J Jᵀ`` once (:func:`~lightning_ntk.gauss_newton.gauss_newton_system`)
and tries ``Δθ = −Jᵀ (K + μI)⁻¹ r̃``; the damping ``μ`` follows the gain ratio

    ρ = (L(θ) − L(θ + Δθ)) / (L(θ) − μ²‖α‖²)

(actual over predicted decrease, Levenberg–Marquardt with Nielsen's update): a step with ``ρ > 0`` is
kept and ``μ ← μ · max(1/3, 1 − (2ρ − 1)³)``; otherwise the parameters are restored bit for bit and the
step is solved again with ``μ ← ν μ``, ``ν ← 2ν`` (the factorization of ``K`` is the only thing redone,
never ``J``), at most ``max_retries`` times.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ntk import tags
from lightning_ntk.checks import non_negative_int, positive_int, positive_number
from lightning_ntk.contract import declared_terms, evaluate_residuals, trainable_parameters
from lightning_ntk.gauss_newton import (
    DEFAULT_MAX_BYTES,
    GaussNewtonSystem,
    apply_update,
    gauss_newton_system,
    loss_rows,
)
from lightning_ntk.gauss_newton_matrix_free import MatrixFreeSystem, matrix_free_system
from lightning_ntk.points import batch_signature

__all__ = ["GaussNewtonRecord", "GaussNewtonWarning", "NTKGaussNewton"]


class GaussNewtonWarning(UserWarning):
    """A Gauss–Newton step found no decrease within its retries (the parameters are unchanged), or the solve
    was asked for in float32."""


@dataclass(frozen=True)
class GaussNewtonRecord:
    """What one step did (``NTKGaussNewton.last``; a :class:`~lightning_ntk.PINNModule` logs it as ``gn/*``).

    Attributes:
        loss_before: ``‖r̃‖²`` at the start of the step.
        loss_after: ``‖r̃‖²`` after it (``loss_before`` if no try was kept).
        damping: ``μ`` of the kept try (of the last try if none was kept).
        next_damping: ``μ`` the next step starts from.
        gain_ratio: ``ρ`` of the kept (or last) try.
        step_norm: ``‖Δθ‖`` of the kept (or last) try.
        retries: Tries rejected before the kept one (all of them if none was kept).
        accepted: Whether a try was kept.
        rows: ``m``, the residual rows of the system.
        condition: ``λ_max(K + μI) / λ_min(K + μI)`` bounded with ``λ_min(K) ≥ 0``, on the steps of
            ``condition_every`` with the dense solver (else ``None``).
        cg_iterations: Conjugate-gradient iterations of the kept (or last) try (``None``: dense solver).
    """

    loss_before: float
    loss_after: float
    damping: float
    next_damping: float
    gain_ratio: float
    step_norm: float
    retries: int
    accepted: bool
    rows: int
    condition: float | None = None
    cg_iterations: int | None = None

    def metrics(self) -> dict[str, float]:
        """The record as ``gn/*`` scalars (:mod:`lightning_ntk.tags`); the optional ones only when measured."""
        out = {
            tags.GN_DAMPING: self.damping,
            tags.GN_GAIN_RATIO: self.gain_ratio,
            tags.GN_STEP_NORM: self.step_norm,
            tags.GN_LOSS_BEFORE: self.loss_before,
            tags.GN_LOSS_AFTER: self.loss_after,
            tags.GN_RETRIES: float(self.retries),
        }
        if self.condition is not None:
            out[tags.GN_CONDITION] = self.condition
        if self.cg_iterations is not None:
            out[tags.GN_CG_ITERATIONS] = float(self.cg_iterations)
        return out


class NTKGaussNewton(torch.optim.Optimizer):
    """Damped Gauss–Newton (Levenberg–Marquardt) in the NTK's residual space, for any module with residuals.

    The step ``Δθ = −Jᵀ (K + μI)⁻¹ r̃`` solves the linearized least-squares problem of the whole loss,
    ``K = J Jᵀ`` the full empirical NTK of all its rows (:mod:`lightning_ntk.gauss_newton`). With a
    :class:`~lightning_ntk.PINNModule`, return it from ``configure_optimizers`` and change nothing else:
    the module hands the step its batch, skips the backward pass the step does not need, and logs ``gn/*``;
    term weights set by :class:`~lightning_ntk.NTKWeightingCallback`, causal and importance scales enter
    ``r̃`` as they enter the loss. The damping is in the optimizer's ``state_dict`` (checkpoints resume it).

    Args:
        module: The module to train (its trainable parameters are this optimizer's).
        damping: The first ``μ > 0``.
        max_retries: Rejected tries per step before the step gives up (parameters unchanged, one
            :class:`GaussNewtonWarning`).
        min_damping: ``μ`` never goes below this (rounding then dominates the solve).
        max_damping: ``μ`` never goes above this.
        dtype: Of ``J``, ``K`` and the solve; ``float64`` by default whatever the model's dtype: a float32
            ``K`` of a PINN has a condition number that float32 cannot hold (``float32`` warns).
        max_bytes: Refuse a batch whose ``J`` and ``K`` take more memory (the error gives the size).
        condition_every: Estimate ``K``'s condition number every this many steps (0: never).
        solver: ``"dense"`` (form ``J`` and ``K``, Cholesky), ``"cg"`` (matrix-free conjugate gradients: ``K v``
            from one backward and one double backward, memory of one residual graph), or ``"auto"``: dense
            while ``J`` and ``K`` fit in ``max_bytes``, else CG (decided once per batch signature).
        cg_tolerance: CG stops at ``‖r̃ − (K + μI) α‖ ≤ cg_tolerance · ‖r̃‖``.
        cg_max_iterations: Or after this many iterations.

    Example::

        class Poisson(PINNModule):
            ...
            def configure_optimizers(self):
                return NTKGaussNewton(self, damping=1e-3)

        trainer = Trainer(max_steps=500, precision="64-true")

    Without Lightning: ``opt = NTKGaussNewton(model)``, then ``opt.step(batch=batch)`` per step.
    """

    def __init__(
        self,
        module: nn.Module,
        damping: float = 1e-3,
        *,
        max_retries: int = 10,
        min_damping: float = 1e-12,
        max_damping: float = 1e10,
        dtype: torch.dtype = torch.float64,
        max_bytes: int = DEFAULT_MAX_BYTES,
        condition_every: int = 10,
        solver: str = "auto",
        cg_tolerance: float = 1e-10,
        cg_max_iterations: int = 1000,
    ) -> None:
        _check_arguments(module, damping, min_damping, max_damping, max_retries, condition_every, dtype, solver)
        positive_int("cg_max_iterations", cg_max_iterations)
        if not 0 < positive_number("cg_tolerance", cg_tolerance) < 1:
            raise ValueError(f"`cg_tolerance` must be a number in (0, 1), got {cg_tolerance!r}.")
        defaults = {"damping": float(damping), "growth": 2.0, "steps": 0}
        super().__init__(list(trainable_parameters(module).values()), defaults)
        self.module = module
        self.max_retries, self.min_damping, self.max_damping = max_retries, float(min_damping), float(max_damping)
        self.dtype, self.max_bytes, self.condition_every = dtype, max_bytes, condition_every
        self.solver, self.cg_tolerance, self.cg_max_iterations = solver, float(cg_tolerance), cg_max_iterations
        self._routes: dict[object, str] = {}  # batch signature → "dense" or "cg" (solver="auto")
        self.pending_batch: object = None
        self.last: GaussNewtonRecord | None = None
        if hasattr(module, "_gauss_newton"):
            module._gauss_newton = self  # the PINNModule hands over its batch and logs the records

    @property
    def damping(self) -> float:
        return self.param_groups[0]["damping"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None, batch: object = None) -> Tensor | None:  # type: ignore[override]
        """One Gauss–Newton step on ``batch`` (default: the batch the module's ``training_step`` just saw).

        Args:
            closure: Lightning's closure (runs ``training_step``); called once, first.
            batch: The batch to step on, for use without Lightning.

        Returns:
            What ``closure`` returned (``None`` without one).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if batch is None:
            batch, self.pending_batch = self.pending_batch, None
        if batch is None:
            raise RuntimeError(
                "NTKGaussNewton.step needs the batch: pass `step(batch=...)`, or use it with a PINNModule, whose "
                "training_step hands the batch over."
            )
        with torch.enable_grad():
            if self._route(batch) == "cg":
                system = matrix_free_system(
                    self.module,
                    batch,
                    dtype=self.dtype,
                    tolerance=self.cg_tolerance,
                    max_iterations=self.cg_max_iterations,
                )
            else:
                system = gauss_newton_system(self.module, batch, dtype=self.dtype, max_bytes=self.max_bytes)
        self.last = self._damped_step(system, batch)
        return loss

    def _route(self, batch: object) -> str:
        if self.solver != "auto":
            return self.solver
        key = batch_signature(batch)
        if key not in self._routes:
            measured, _ = loss_rows(self.module, batch)
            m = sum(r.numel() for r in evaluate_residuals(measured, batch, declared_terms(self.module)).values())
            p = sum(p.numel() for group in self.param_groups for p in group["params"])
            need = (m * p + m * m) * torch.empty((), dtype=self.dtype).element_size()
            self._routes[key] = "cg" if need > self.max_bytes else "dense"
        return self._routes[key]

    def _damped_step(self, system: GaussNewtonSystem | MatrixFreeSystem, batch: object) -> GaussNewtonRecord:
        group = self.param_groups[0]
        mu, growth = group["damping"], group["growth"]
        before = system.loss
        saved = {name: p.detach().clone() for name, p in system.params.items()}
        history: list[float] = []
        accepted = False
        while not accepted and len(history) <= self.max_retries:
            alpha, flat = system.solve(mu)
            apply_update(system.params, system.unflatten(flat))
            with torch.enable_grad():
                after = system.loss_now(batch)
            predicted = before - system.predicted_loss(alpha, mu)
            ratio = (before - after) / predicted if predicted > 0 else -math.inf
            history.append(mu)
            accepted = math.isfinite(after) and ratio > 0
            if accepted:
                shrink = max(1 / 3, 1 - (2 * ratio - 1) ** 3)
                group["damping"], group["growth"] = min(max(mu * shrink, self.min_damping), self.max_damping), 2.0
                continue
            for name, p in system.params.items():
                p.copy_(saved[name])
            mu, growth = min(mu * growth, self.max_damping), growth * 2
            group["damping"], group["growth"] = mu, growth
        if not accepted:
            after = before
            tried = ", ".join(f"{d:.3g}" for d in history)
            warnings.warn(
                f"NTKGaussNewton: no decrease in {len(history)} tries (damping {tried}); the parameters are unchanged. "
                "The loss may be at a minimum on these points, or the linear model poor this far from it: try fresh "
                "points, a larger `max_retries`, or a first-order warm-up before Gauss–Newton.",
                GaussNewtonWarning,
                stacklevel=3,
            )
        group["steps"] += 1
        condition = None
        dense = isinstance(system, GaussNewtonSystem)
        if dense and self.condition_every and group["steps"] % self.condition_every == 0:
            condition = (_largest_eigenvalue(system.kernel) + history[-1]) / history[-1]
        return GaussNewtonRecord(
            loss_before=before,
            loss_after=after,
            damping=history[-1],
            next_damping=group["damping"],
            gain_ratio=ratio,
            step_norm=float(flat.norm()),
            retries=len(history) - 1 if accepted else len(history),
            accepted=accepted,
            rows=system.residual.numel(),
            condition=condition,
            cg_iterations=None if dense else system.iterations,
        )


def _check_arguments(
    module: nn.Module,
    damping: object,
    min_damping: object,
    max_damping: object,
    max_retries: object,
    condition_every: object,
    dtype: object,
    solver: object,
) -> None:
    """A clear error for the first bad argument of :class:`NTKGaussNewton`; the float32 warning."""
    if not callable(getattr(module, "residuals", None)):
        raise TypeError(f"{type(module).__name__} has no `residuals(batch)`; see lightning_ntk.PINNModule.")
    low, first, high = (positive_number(n, v) for n, v in (("min_damping", min_damping), ("damping", damping),
                                                             ("max_damping", max_damping)))  # fmt: skip
    if not low <= first <= high:
        raise ValueError(f"`damping` {first} must lie in [min_damping, max_damping] = [{low}, {high}].")
    non_negative_int("max_retries", max_retries)
    non_negative_int("condition_every", condition_every)
    if solver not in ("auto", "dense", "cg"):
        raise ValueError(f"`solver` must be 'auto', 'dense' or 'cg', got {solver!r}.")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype!r}.")
    if dtype == torch.float32:
        warnings.warn(
            "NTKGaussNewton(dtype=torch.float32): K and the solve in float32 ended 30x less accurate than in "
            "float64 at equal time on the 2-D Poisson benchmark (benchmarks/gauss_newton_precision.py), while a "
            "float32 model with the default float64 K matched a float64 model. Keep dtype=torch.float64.",
            GaussNewtonWarning,
            stacklevel=3,
        )
    if getattr(module, "capture_step", False):
        raise ValueError(
            "NTKGaussNewton cannot run inside a captured training step (capture_step=True): its step reads the "
            "gain ratio on the host. Build the module with capture_step=False."
        )


def _largest_eigenvalue(kernel: Tensor, iterations: int = 30) -> float:
    """``λ_max`` of a symmetric positive semi-definite matrix by power iteration (fixed start: reproducible)."""
    v = torch.ones(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    value = 0.0
    for _ in range(iterations):
        w = kernel @ v
        norm = float(torch.linalg.vector_norm(w))
        if norm == 0.0:
            return 0.0
        value, v = norm / float(torch.linalg.vector_norm(v)), w / norm
    return value

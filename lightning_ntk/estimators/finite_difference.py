"""Forward-only predictor–corrector sketch: central finite differences along random directions.

Predictor: perturb all trainable parameters along a Rademacher direction ``z``, ``θ ± h z``, and
re-evaluate the residuals. Corrector: ``d_i = (r_i(θ + h z) − r_i(θ − h z)) / 2h ≈ J_i z`` and

    Tr K_ii = E_z ‖J_i z‖² ≈ mean over probes of ‖d_i‖²

(inspired by Hirsch & Pichi 2025's predictor–corrector with matrix sketching). One probe gives
every term at once from two residual evaluations and no backward pass, so it works with any
residual code, including code ``torch.func`` cannot transform. The central difference has error
``O(h²)``; averaged over probes (or over training steps, see the callback's ``trace_ema``) it is
unbiased up to that error. With ``points_per_probe = m`` each probe evaluates ``m`` random points
per term and scales by ``N_i/m``, which stays unbiased (points and direction are drawn independently)
and cuts the cost of a probe to ``m/N_i``. The default, ``points_per_probe="auto"``, takes
``max(64, ⌈N_i/16⌉)`` points of each term. The spread of a one-probe estimate comes from the direction
``z``, not from the points: measured on three PINNs (``benchmarks/fd_points.py``), its relative standard
deviation is the same with a sixteenth, an eighth or all of the points, while the cost of a probe
falls with the points (with a fixed part per evaluation). Averaging over steps removes the rest. Residuals that
are not pointwise (row ``n`` depends on other points) are detected once and evaluated on all points.

Step rule: ``h = c · eps^(1/3) · ‖θ‖ / ‖z‖`` with ``eps`` the machine epsilon of the parameters'
dtype, ``‖z‖ = √P``, and ``c = step_scale`` (default 0.1). ``eps^(1/3)`` balances truncation
(``∝ h²``) against rounding (``∝ eps/h``) for central differences; scaling by ``‖θ‖ / ‖z‖`` makes the
perturbation a fixed fraction of the parameter norm. Measured in float32 on a Poisson PINN:
``c = 0.1–0.3`` bias < 1e-4 relative; ``c = 0.001`` (rounding) and ``c ≥ 10`` (truncation) 1e-2 to 0.78.

The perturbed parameters are swapped in with ``torch.func.functional_call``, so the module's own
parameters are never written (they stay bit-identical, also when the residual raises, and no
autograd version counter changes); ``param.grad`` is never touched. Standard error: sample standard deviation of the
probe values over ``√k`` (NaN for one probe).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten

from lightning_ntk.contract import ResidualCaller, check_residuals, declared_terms, trainable_parameters
from lightning_ntk.estimators._sampling import mean_and_stderr, rademacher, sample_points
from lightning_ntk.estimators.base import (
    TraceEstimate,
    TraceEstimator,
    check_positive_int,
    check_positive_number,
    register_estimator,
)
from lightning_ntk.points import check_point_counts, pointwise, subsample_batch

__all__ = ["AUTO_MIN_POINTS", "FiniteDifference", "auto_points_per_probe", "fd_step_size", "finite_difference_traces"]


def fd_step_size(params: list[Tensor], direction_norm: float, step_scale: float = 0.1) -> Tensor:
    """``h = step_scale · eps^(1/3) · ‖θ‖ / ‖z‖`` for the parameters' dtype, as a 0-dim tensor on
    their device (no host sync)."""
    eps = torch.finfo(params[0].dtype).eps
    theta_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach()) for p in params]))
    # A network at θ = 0 still needs a perturbation of a sensible size.
    return step_scale * eps ** (1 / 3) * theta_norm.clamp_min(1.0) / direction_norm


def _evaluate_at(caller: ResidualCaller, params: dict[str, Tensor], batch: object, terms) -> dict[str, Tensor]:
    with torch.enable_grad():  # ordinary-style residuals take input derivatives with autograd
        out = functional_call(caller, params, (batch,))
    return {name: r.detach() for name, r in check_residuals(out, terms, require_grad=False).items()}


# "auto" points per probe: a sixteenth of each term's points, but never fewer than this many.
AUTO_MIN_POINTS = 64
AUTO_FRACTION = 16


def auto_points_per_probe(size: int) -> int:
    """The points of a term of ``size`` points that one probe evaluates under ``points_per_probe="auto"``."""
    return min(size, max(AUTO_MIN_POINTS, math.ceil(size / AUTO_FRACTION)))


PointsPerProbe = int | Literal["auto"] | None


def _check_points_per_probe(points_per_probe: object) -> None:
    if points_per_probe is None or points_per_probe == "auto":
        return
    check_positive_int(points_per_probe, "points_per_probe")


def _step_size(params: list[Tensor], step_scale: float, step_size: float | None) -> Tensor:
    if step_size is not None:
        return torch.tensor(step_size, dtype=params[0].dtype, device=params[0].device)
    return fd_step_size(params, sum(p.numel() for p in params) ** 0.5, step_scale)


def _point_sampler(
    module: nn.Module,
    batch: object,
    evaluate: Callable[[object], Mapping[str, Tensor]],
    points_per_probe: PointsPerProbe,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Callable[[], object] | None, dict[str, int]]:
    """A function that draws one probe's batch (``None``: every probe evaluates every point), and the
    point count of every term (empty when there is no subsampling)."""
    if points_per_probe is None:
        return None, {}

    def count(n: int) -> int:
        return auto_points_per_probe(n) if points_per_probe == "auto" else int(points_per_probe)

    def draw(n: int) -> Tensor:
        return sample_points(n, count(n), generator=generator, device=device)

    if points_per_probe == "auto" and (_max_leading_size(batch) <= AUTO_MIN_POINTS or not pointwise(module, batch)):
        return None, {}
    # The one-time point-count check draws from a generator of its own: a resumed run (a fresh module,
    # so the check runs again) must see the same probe stream as an uninterrupted one.
    check_draws = torch.Generator().manual_seed(0)
    try:
        counts = check_point_counts(
            module, batch, evaluate, lambda n: sample_points(n, count(n), generator=check_draws, device=device)
        )
    except ValueError as err:
        if points_per_probe != "auto":
            raise ValueError(f"{err} Use points_per_probe=None for this module.") from err
        warnings.warn(f"{err} points_per_probe='auto' evaluates every point of this module instead.", stacklevel=4)
        return None, {}
    if all(count(n) >= n for n in counts.values()):
        return None, {}
    sizes = sorted(set(counts.values()))
    return (lambda: subsample_batch(batch, {n: draw(n) for n in sizes})), counts


def _max_leading_size(batch: object) -> int:
    leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor) and t.ndim > 0]
    return max((t.shape[0] for t in leaves), default=0)


def finite_difference_traces(
    module: nn.Module,
    batch: object,
    *,
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    step_scale: float = 0.1,
    step_size: float | None = None,
    points_per_probe: PointsPerProbe = "auto",
) -> TraceEstimate:
    """Estimate ``Tr K_ii`` for every term from ``2 × num_probes`` residual evaluations.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch)``.
        batch: The batch ``residuals`` takes.
        num_probes: Random directions ``z``.
        generator: Seeds the directions (and the points).
        step_scale: ``c`` in the step rule above.
        step_size: A fixed ``h`` instead of the rule (for studies of the ``O(h²)`` error).
        points_per_probe: Evaluate each probe on this many random points of every term (all points
            of terms with fewer) and scale by ``N_i / m``: still unbiased, ``m / N_i`` of the cost.
            ``"auto"`` (default): ``max(64, ⌈N_i/16⌉)``; ``None``: every point. Subsampling needs
            pointwise residuals; the first call per module and batch signature checks that with one full
            and one subsampled evaluation, and raises if it does not hold (``"auto"`` warns and uses
            every point instead).

    Example:
        >>> import torch
        >>> class Fit(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(1, 1, bias=False).double()
        ...     def residuals(self, x):
        ...         return {"data": self.lin(x)}
        >>> est = finite_difference_traces(Fit(), torch.ones(1, 1, dtype=torch.float64), num_probes=3)
        >>> round(float(est.traces["data"]), 6)  # r = w: every probe gives z² = 1 = Tr K
        1.0
    """
    _check_call(num_probes, step_scale, step_size, points_per_probe)
    terms = declared_terms(module)
    named = {f"inner.{name}": p.detach() for name, p in trainable_parameters(module).items()}
    params = list(named.values())
    h = _step_size(params, step_scale, step_size)
    caller = ResidualCaller(module)

    def evaluate(b: object, shift: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        values = named if shift is None else {k: p + shift[k] for k, p in named.items()}
        return _evaluate_at(caller, values, b, terms)

    sampler, layout = _point_sampler(module, batch, evaluate, points_per_probe, generator, params[0].device)
    samples: dict[str, list[Tensor]] = {}
    rows: dict[str, int] = {}

    def probe_batch() -> object:
        return batch if sampler is None else sampler()

    for _ in range(num_probes):
        for name, (sample, count) in _one_probe(evaluate, named, h, generator, probe_batch, layout).items():
            samples.setdefault(name, []).append(sample)
            rows[name] = count
    stats = {name: mean_and_stderr(torch.stack(values)) for name, values in samples.items()}
    info = {"num_probes": num_probes, "step_size": h, "points_per_probe": points_per_probe}
    return TraceEstimate({n: t for n, (t, _) in stats.items()}, {n: e for n, (_, e) in stats.items()}, rows, "fd", info)


def _one_probe(
    evaluate: Callable[..., dict[str, Tensor]],
    named: Mapping[str, Tensor],
    h: float,
    generator: torch.Generator | None,
    probe_batch: Callable[[], object],
    layout: Mapping[str, int],
) -> dict[str, tuple[Tensor, int]]:
    """One probe ``z``: per term ``‖(r(θ+hz) − r(θ−hz)) / 2h‖²`` scaled from the points evaluated to all ``N_i``,
    and the term's row count. ``z`` is drawn before ``probe_batch()`` draws the points (same generator)."""
    hz = {
        k: h * rademacher(tuple(p.shape), generator=generator, device=p.device, dtype=p.dtype) for k, p in named.items()
    }
    b = probe_batch()
    # Perturbed copies are swapped in by functional_call and swapped out again in its own
    # `finally`, so the module's parameters are never written to.
    plus = evaluate(b, hz)
    minus = evaluate(b, {k: -v for k, v in hz.items()})
    out = {}
    for name in plus:
        points = layout.get(name, plus[name].shape[0])
        diff = (plus[name] - minus[name]) / (2 * h)
        # Row count from integers: no rounding down.
        out[name] = (diff.square().sum() * (points / diff.shape[0]), plus[name].numel() // plus[name].shape[0] * points)
    return out


def _check_call(num_probes: int, step_scale: float, step_size: float | None, points_per_probe: PointsPerProbe) -> None:
    check_positive_int(num_probes, "num_probes")
    check_positive_number(step_scale, "step_scale")
    check_positive_number(step_size, "step_size", allow_none=True)
    _check_points_per_probe(points_per_probe)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("NTK traces cannot be computed under torch.inference_mode.")


@register_estimator("fd")
class FiniteDifference(TraceEstimator):
    """The forward-only central-difference sketch (:func:`finite_difference_traces`).

    Args:
        num_probes: Random directions per update (two residual evaluations each).
        points_per_probe: Points per term each probe evaluates: an int, ``"auto"`` (``max(64, ⌈N_i/16⌉)``)
            or ``None`` (every point).
        step_scale: ``c`` in the step rule ``h = c · eps^(1/3) · ‖θ‖ / ‖z‖``.
        step_size: A fixed ``h`` instead of the rule.

    Example:
        >>> FiniteDifference(num_probes=2, points_per_probe=128)
        FiniteDifference(num_probes=2, points_per_probe=128, step_scale=0.1, step_size=None)
    """

    function = staticmethod(finite_difference_traces)

    def __init__(
        self,
        num_probes: int = 1,
        points_per_probe: PointsPerProbe = "auto",
        step_scale: float = 0.1,
        step_size: float | None = None,
    ) -> None:
        check_positive_int(num_probes, "num_probes")
        _check_points_per_probe(points_per_probe)
        check_positive_number(step_scale, "step_scale")
        check_positive_number(step_size, "step_size", allow_none=True)
        super().__init__(
            num_probes=num_probes, points_per_probe=points_per_probe, step_scale=step_scale, step_size=step_size
        )

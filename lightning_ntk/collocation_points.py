"""A term's collocation points in the user's batch, and the candidates that replace them: found, swapped, checked.

:class:`~lightning_ntk.AdaptiveCollocation` draws points into one tensor of each batch. Everything here is about
that tensor and the pool it is drawn from, and says what to change when either is not what the term's residual
reads: which tensor holds a term's points (:func:`term_points`), the batch with it swapped for other points
(:func:`with_points`), whether the term's residual reads it row by row (:func:`check_points_are_read`), and whether
a sampler's pool fits it (:func:`check_pool`, :func:`domain_excess`). Pure torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_ntk.contract import check_residuals, declared_terms

__all__ = ["check_points_are_read", "check_pool", "domain_excess", "parameters_frozen", "term_points", "with_points"]


def _points_option(name: str) -> str:
    return f"`points={{{name!r}: lambda batch: ...}}`"


def term_points(batch: Any, name: str, locate: Callable[[Any], Tensor] | None) -> Tensor:
    """The tensor of ``batch`` that holds term ``name``'s points: ``locate(batch)``, or ``batch[name]``."""
    if locate is None and not isinstance(batch, Mapping):
        raise ValueError(
            f"AdaptiveCollocation: the batch is a {type(batch).__name__}, not a mapping with the key {name!r}: pass "
            f"{_points_option(name)} returning the tensor of term {name!r}'s points in the batch "
            "(e.g. `lambda batch: batch[1]`)."
        )
    target = locate(batch) if locate is not None else batch[name]
    if not isinstance(target, Tensor) or target.ndim < 1:
        raise ValueError(
            f"AdaptiveCollocation: the points of term {name!r} in the batch must be a tensor with one row per "
            f"point, got {type(target).__name__}; pass {_points_option(name)}."
        )
    return target


def with_points(batch: Any, target: Tensor, replacement: Tensor) -> Any:
    """``batch`` with the leaf that is ``target`` replaced (the other leaves shared, not copied)."""
    leaves, spec = tree_flatten(batch)
    hits = [i for i, leaf in enumerate(leaves) if leaf is target]
    if len(hits) != 1:
        raise ValueError(
            "AdaptiveCollocation: a term's `points(batch)` must return one tensor of the batch itself (a leaf of "
            "its dicts, lists and tuples), not a view or a copy of it."
        )
    leaves[hits[0]] = replacement
    return tree_unflatten(leaves, spec)


@contextlib.contextmanager
def parameters_frozen(module: nn.Module) -> Iterator[None]:
    """The module's trainable parameters with ``requires_grad=False`` inside, restored after."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def check_points_are_read(module: nn.Module, batch: Any, name: str, target: Tensor) -> None:
    """Raise unless term ``name``'s residual reads ``target``: with every entry of ``target`` NaN, some row of the
    residual must turn non-finite, and it must keep one row per point of ``target``.

    A ``points`` function aimed at another tensor of the same size (the boundary points instead of the interior
    ones) passes every shape check and would silently train the term on the other term's points; this probe,
    one residual evaluation, is what catches it.
    """
    probe = torch.full_like(target, float("nan")).requires_grad_(target.requires_grad)
    # The NaNs are deliberate: anomaly detection (`Trainer(detect_anomaly=True)`) would stop at the first one.
    with parameters_frozen(module), torch.enable_grad(), torch.autograd.set_detect_anomaly(False):
        returned = module.residuals(with_points(batch, target, probe))
    residual = check_residuals(returned, declared_terms(module), require_grad=False)[name]
    rows, points = residual.shape[0], target.shape[0]
    if rows == points and not bool(torch.isfinite(residual.detach()).all()):
        return
    what = (
        f"has {rows} rows for the tensor's {points} points"
        if rows != points
        else "stays finite when every point of that tensor is NaN, so it does not read them"
    )
    raise ValueError(
        f"AdaptiveCollocation: the tensor given as term {name!r}'s points ({tuple(target.shape)}) is not the one its "
        f"residual reads: term {name!r}'s residual {what}. Pass {_points_option(name)} returning the tensor of the "
        f"batch that holds term {name!r}'s points, one row per residual row (drawn points are written into it)."
    )


def check_pool(name: str, pool: object, target: Tensor, size: int) -> Tensor:
    """``pool`` (what term ``name``'s sampler returned for ``size`` candidates) on ``target``'s device, or an error
    that says what the sampler must return."""
    shape = ", ".join(map(str, (size, *target.shape[1:])))
    fix = f"The sampler of term {name!r} must return ({shape}) {target.dtype} points"
    if not isinstance(pool, Tensor):
        raise TypeError(f"{fix}; it returned {type(pool).__name__}.")
    if pool.ndim != target.ndim or pool.shape[0] < target.shape[0] or pool.shape[1:] != target.shape[1:]:
        raise ValueError(
            f"{fix} (a pool at least as large as the batch's {target.shape[0]} points); it returned shape "
            f"{tuple(pool.shape)} for n={size}."
        )
    if pool.dtype != target.dtype:
        raise ValueError(f"{fix}; it returned {pool.dtype}.")
    if pool.device.type != "cpu" and pool.device != target.device:
        where = "the CPU" if target.device.type == "cpu" else f"the CPU or {target.device}"
        raise ValueError(f"{fix} on {where}; it returned them on {pool.device}.")
    return pool.to(target.device)


def domain_excess(name: str, pool: Tensor, target: Tensor) -> str | None:
    """A warning when the candidates reach well beyond the bounding box of the batch's own ``(N, d)`` points in
    some coordinate (a sampler of the wrong domain), else ``None``."""
    if target.ndim != 2 or target.shape[0] < 2:
        return None
    low, high = target.detach().amin(0), target.detach().amax(0)
    # A uniform sample of N points misses about 1/N of its domain's width at each end: allow a quarter of
    # the width plus four such gaps before calling the sampler's domain another one.
    margin = (0.25 + 4 / target.shape[0]) * (high - low)
    beyond = ((pool.amin(0) < low - margin) | (pool.amax(0) > high + margin)).nonzero().flatten().tolist()
    if not beyond:
        return None

    def box(lo: Tensor, hi: Tensor) -> list[tuple[float, float]]:
        return [(round(float(a), 4), round(float(b), 4)) for a, b in zip(lo, hi, strict=True)]

    return (
        f"AdaptiveCollocation: the sampler of term {name!r} returns points in "
        f"{box(pool.amin(0), pool.amax(0))} per coordinate, well beyond the batch's own points "
        f"{box(low, high)} in coordinate(s) {beyond}. Give a sampler of the term's domain: points outside it "
        "train the network where the PDE does not hold."
    )

"""Input derivatives of a network that work in plain autograd *and* under ``torch.func``.

PINN residuals need derivatives of the network output with respect to its inputs (``u_x``,
``u_xx``, ``u_t``). Written with ``torch.autograd.grad(..., create_graph=True)`` they train fine but
cannot run inside ``torch.func`` transforms, which is what makes exact NTK traces fast (``vmap``
over points of the per-point parameter Jacobian). The helpers here take the derivatives of a
per-point function, ``vmap``-ed over points: nested reverse-mode ``torch.func.grad`` where a point
has one output value, nested forward-mode ``torch.func.jvp`` where it has several. The result is
differentiable with respect to the network's parameters in both worlds, so the same residual code is
used for the training loss and for the NTK.

Why reverse mode for one output: forward-mode AD gives every parameter a zero tangent, and PyTorch
(2.4 to 2.15, CPU) works out the shape of each sum with such a zero through a Python function, about
0.35 ms each, several per layer and order. ``benchmarks/derivatives_cost.py`` (3×256 tanh MLP, one
thread): ``u_xx`` on 128 points 10.0 ms by nested ``jvp`` against 3.9 ms by nested ``grad``, on 1,024
points 45 against 23 ms, and with the backward of ``Σ u_xx²`` 98 against 57 ms; the same values to
float32 rounding.

Every helper takes ``fn``, a callable mapping a batch of points ``(n, d)`` to outputs ``(n,)`` or
``(n, k)`` (typically the network itself), and the points ``x`` of shape ``(N, d)``. Row ``n`` of the
result depends only on point ``n``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

__all__ = ["gradient", "laplacian", "partial"]

PointwiseFn = Callable[[Tensor], Tensor]


def _check_points(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Points must be a tensor of shape (N, d), got {shape}; use x.reshape(-1, 1) for 1-D.")


def _per_point(fn: PointwiseFn) -> PointwiseFn:
    # Evaluate the batch function on a batch of one point, so `fn` may be any nn.Module.
    def point_fn(xi: Tensor) -> Tensor:
        return fn(xi.unsqueeze(0)).squeeze(0)

    return point_fn


def _directional(g: Callable[..., Tensor], k: int) -> Callable[..., Tensor]:
    # The direction is an argument vmapped with the point, not a constant: then every tangent has one
    # row per point, which keeps the parameter uses per point (the Gram path of the exact traces).
    def dg(xi: Tensor, *directions: Tensor) -> Tensor:
        return jvp(lambda y: g(y, *directions), (xi,), (directions[k],))[1]

    return dg


def _outside_inference_mode(helper: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``helper(fn, x, ...)`` with autograd on even under ``torch.inference_mode``: validation under
    ``Trainer(inference_mode=True)`` must still get ``u_xx``, and ``torch.func`` transforms need autograd
    there (forward-mode AD under vmap has no batching rule in inference mode on some torch versions,
    2.11: ``aten::_make_dual``). The points are cloned out of inference mode."""

    @functools.wraps(helper)
    def wrapped(fn: PointwiseFn, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return helper(fn, x.clone() if isinstance(x, Tensor) else x, *args, **kwargs)
        return helper(fn, x, *args, **kwargs)

    return wrapped


@_outside_inference_mode
def partial(fn: PointwiseFn, x: Tensor, *dims: int) -> Tensor:
    """Mixed partial derivative ``∂^k fn / ∂x_{dims[0]} … ∂x_{dims[k-1]}`` at every point.

    Args:
        fn: Maps points ``(n, d)`` to outputs ``(n,)`` or ``(n, k)``.
        x: Points, shape ``(N, d)``.
        dims: Input dimensions to differentiate along, one per order; none returns ``fn(x)`` per point.

    Returns:
        A tensor shaped like ``fn(x)``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> xt = torch.rand(8, 2)
        >>> u_t = partial(net, xt, 1)        # ∂u/∂t
        >>> u_xx = partial(net, xt, 0, 0)    # ∂²u/∂x²
        >>> u_xx.shape
        torch.Size([8, 1])
    """
    _check_points(x)
    d = x.shape[-1]
    _check_dims(x, dims)
    point_fn = _per_point(fn)
    out = _by_reverse_mode(fn, lambda: _reverse(point_fn, x, dims)) if dims else None
    if out is not None:
        return out
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    def g(xi: Tensor, *directions: Tensor) -> Tensor:
        return point_fn(xi)

    for k in range(len(dims)):
        g = _directional(g, k)
    return vmap(g)(x, *(eye[dim].expand_as(x) for dim in dims))


class _SeveralValues(Exception):
    """A point's output has more than one value: reverse mode would need one pass per value."""


# Functions (modules) found to give several values per point, so later calls go straight to `jvp`:
# owner → the functions of it found so (``None``: the owner itself is the function).
_several_values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _memo_key(fn: PointwiseFn) -> tuple[object, object]:
    # A bound method (``self.u``) is a new object at every attribute access: remembered by its instance
    # and function, or it would never be found again.
    if inspect.ismethod(fn):
        return fn.__self__, fn.__func__
    return fn, None


def _known_several_values(fn: PointwiseFn) -> bool:
    owner, func = _memo_key(fn)
    try:
        return func in _several_values.get(owner, ())
    except TypeError:  # not weakly referenceable
        return False


def _remember_several_values(fn: PointwiseFn) -> None:
    # A function that is not weakly referenceable is not remembered: its next call tries reverse mode again.
    owner, func = _memo_key(fn)
    with contextlib.suppress(TypeError):
        _several_values.setdefault(owner, set()).add(func)


def _check_dims(x: Tensor, dims: tuple[int, ...]) -> None:
    for dim in dims:
        if not isinstance(dim, int) or not 0 <= dim < x.shape[-1]:
            raise ValueError(f"Derivative dimension {dim!r} is out of range for points with d={x.shape[-1]}.")


def _by_reverse_mode(fn: PointwiseFn, compute: Callable[[], Tensor]) -> Tensor | None:
    """``compute()`` (a reverse-mode path), or ``None`` where ``fn`` gives several values per point (then
    remembered, so that its later calls skip straight to the forward-mode path)."""
    if _known_several_values(fn):
        return None
    try:
        return compute()
    except _SeveralValues:
        _remember_several_values(fn)
        return None


def _reverse(point_fn: PointwiseFn, x: Tensor, dims: tuple[int, ...], whole: bool = False) -> Tensor:
    """``∂^k point_fn / ∂x_{dims}`` of a function with one value per point by nested ``grad``; with
    ``whole``, the gradient of that with respect to the point, ``(N, d)``."""
    shape: list[torch.Size] = []
    h = _one_value(point_fn, shape)
    for dim in dims:
        h = _component(grad(h), dim)
    if whole:
        return vmap(grad(h))(x)
    out = vmap(h)(x)
    return out.reshape(x.shape[0], *shape[0])


def _one_value(point_fn: PointwiseFn, shape: list[torch.Size]) -> Callable[[Tensor], Tensor]:
    """``point_fn`` as a function to a 0-dim tensor (for ``grad``); the shape of its value goes to ``shape``."""

    def value(xi: Tensor) -> Tensor:
        out = point_fn(xi)
        if out.numel() != 1:
            raise _SeveralValues
        shape.append(out.shape)
        return out.reshape(())

    return value


def _reverse_laplacian(point_fn: PointwiseFn, x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Σ_j ∂²point_fn/∂x_j²`` of a function with one value per point: one evaluation and one gradient per
    point, then one more backward of that gradient per ``j`` (its graph is kept, not rebuilt for each ``j``)."""
    shape: list[torch.Size] = []
    value = _one_value(point_fn, shape)

    def at_point(xi: Tensor, *directions: Tensor) -> Tensor:
        _, pullback = vjp(grad(value), xi)
        total = pullback(directions[0])[0][dims[0]]
        for e, j in zip(directions[1:], dims[1:], strict=True):
            total = total + pullback(e)[0][j]
        return total

    # The unit vectors are vmapped with the points (not constants), so that every product in the second
    # backward has one row per point (the Gram path of the exact traces needs it).
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    out = vmap(at_point)(x, *(eye[j].expand_as(x) for j in dims))
    return out.reshape(x.shape[0], *shape[0])


def _component(g: Callable[[Tensor], Tensor], dim: int) -> Callable[[Tensor], Tensor]:
    def picked(xi: Tensor) -> Tensor:
        return g(xi)[dim]

    return picked


@_outside_inference_mode
def gradient(fn: PointwiseFn, x: Tensor) -> Tensor:
    """Gradient of a scalar-output ``fn`` at every point, shape ``(N, d)`` (one reverse pass for all ``d``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> gradient(net, torch.rand(8, 2)).shape
        torch.Size([8, 2])
    """
    _check_points(x)
    out = _by_reverse_mode(fn, lambda: _reverse(_per_point(fn), x, (), whole=True))  # all columns in one pass
    if out is not None:
        return out
    columns = [partial(fn, x, j).reshape(x.shape[0]) for j in range(x.shape[-1])]
    return torch.stack(columns, dim=-1)


@_outside_inference_mode
def laplacian(fn: PointwiseFn, x: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """Sum of pure second derivatives ``Σ_j ∂²fn/∂x_j²`` at every point, shaped like ``fn(x)``. With one
    value per point: one evaluation and one gradient per point, then one more backward per dimension.

    Args:
        fn: Maps points ``(n, d)`` to outputs ``(n,)`` or ``(n, k)``.
        x: Points, shape ``(N, d)``.
        dims: Which input dimensions to include (default: all), e.g. ``(0,)`` for space only in ``(x, t)``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> laplacian(net, torch.rand(8, 2)).shape
        torch.Size([8, 1])
    """
    _check_points(x)
    dims = tuple(range(x.shape[-1])) if dims is None else tuple(dims)
    if not dims:
        raise ValueError("`dims` is empty: name at least one input dimension.")
    _check_dims(x, dims)
    out = _by_reverse_mode(fn, lambda: _reverse_laplacian(_per_point(fn), x, dims))
    if out is not None:
        return out
    total = partial(fn, x, dims[0], dims[0])
    for j in dims[1:]:
        total = total + partial(fn, x, j, j)
    return total

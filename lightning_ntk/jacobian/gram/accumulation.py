"""Per-point squared norms and Jacobian rows from the recorded uses' gradients.

Each use's gradient becomes rank-one factors ``x_{n,k} ⊗ y_{n,k}`` (or a dense per-point part) of its
parameter's per-point gradient, in that parameter's :class:`~lightning_ntk.jacobian.gram.accumulator.Accumulator`,
which squares them by the per-layer Gram identities (:mod:`~lightning_ntk.jacobian.gram.accumulator`).

:func:`plan_use` works out once per module and batch signature what a use needs on every call
(orientation, index maps on the device); :func:`term_norms` does the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_ntk.jacobian.gram.accumulator import Accumulator, blocks, sum_all
from lightning_ntk.jacobian.gram.layouts import Layout, UsePlan
from lightning_ntk.jacobian.gram.recording import GramUnsupported, Use, UseKind

__all__ = ["plan_use", "term_jacobian", "term_norms"]

# A parameter whose uses need dense per-point gradients (elementwise uses) may take at most this
# many bytes of them; beyond, the caller falls back (or chunks the points).
_DENSE_BYTES = 1 << 29


# ------------------------------------------------------------------ once per module and batch signature


def plan_use(use: Use, layout: Layout, n: int, params: Mapping[str, Tensor]) -> UsePlan:
    """Everything ``use`` needs on every call, from its index maps (read here, once, on the CPU)."""
    p = params[use.name]
    if use.kind is UseKind.ELEMENTWISE:
        index = layout.points_first(use.index.expand(use.output.shape), n)[0].reshape(-1)
        if n * p.numel() * use.output.element_size() > _DENSE_BYTES:
            raise GramUnsupported("too many points for the dense per-point gradient of an elementwise parameter use")
        if index.shape == (p.numel(),) and torch.equal(index, torch.arange(p.numel())):
            return UsePlan(layout, identity=True)  # a bias: no scatter needed
        return UsePlan(layout, flat_index=index.to(p.device))
    index = use.index.transpose(-1, -2) if use.kind is UseKind.LEFT else use.index
    plan = UsePlan(_right_layout(use, layout), same=_orientation(index, tuple(p.shape), use.view_of_base))
    if use.factor is not None:
        _plan_factor(plan, use, p)
    return plan


def _right_layout(use: Use, layout: Layout) -> Layout:
    """The layout in the frame where every product is ``Y = L @ P`` (``P @ R`` is ``Rᵀ @ Pᵀ``)."""
    if use.kind is not UseKind.LEFT:
        return layout
    ndim = use.output.ndim
    axis = layout.axis if layout.axis < ndim - 2 else ndim - 2
    return Layout(axis, layout.split, layout.offset)


def _orientation(index: Tensor, shape: tuple[int, ...], view_of_base: bool) -> bool:
    """For a product operand with index map ``(.., K, O)``: True if it is ``W``, False if ``Wᵀ``."""
    if len(shape) != 2:
        raise GramUnsupported("a parameter with other than two dimensions is used in a matrix product")
    # Fast answer from the geometry of a view of the parameter's own arange (a copy's strides say
    # nothing about its values): W itself or Wᵀ, broadcast (stride 0) over any batch dims.
    lead = index.ndim - 2
    if (
        view_of_base
        and index.storage_offset() == 0
        and all(index.stride(i) == 0 or index.shape[i] == 1 for i in range(lead))
    ):
        geometry = (tuple(index.shape[lead:]), index.stride()[lead:])
        if geometry == (shape, (shape[1], 1)):
            return True
        if geometry == ((shape[1], shape[0]), (1, shape[1])):
            return False
    flat = index.reshape(-1, *index.shape[-2:])
    grid = torch.arange(shape[0] * shape[1]).view(shape)
    if not bool((flat == flat[:1]).all()):
        raise GramUnsupported("a parameter operand of a batched product differs between batch entries")
    first = flat[0]
    if first.shape == grid.shape and torch.equal(first, grid):
        return True
    if first.shape == grid.T.shape and torch.equal(first, grid.T):
        return False
    raise GramUnsupported("a slice or reshaped view of a weight is used in a matrix product")


def _plan_factor(plan: UsePlan, use: Use, v: Tensor) -> None:
    """For ``Q = exp(S) ⊙ V``: whether ``S`` scales rows or columns of ``V``, and the index maps."""
    frame = use.index.reshape(-1, *use.index.shape[-2:])[0].reshape(-1)
    s_index = use.factor.index.reshape(-1, *use.factor.index.shape[-2:])[0].reshape(-1)
    index = torch.empty(v.numel(), dtype=torch.long)
    index[frame] = s_index
    index = index.view(v.shape)
    if bool((index == index[:, :1]).all()):
        plan.factor_along, rows = 0, index[:, 0]  # one factor per row of V
    elif bool((index == index[:1, :]).all()):
        plan.factor_along, rows = 1, index[0, :]  # one factor per column of V
    else:
        raise GramUnsupported("a weight exp(S) ⊙ V whose factor varies along both axes of V")
    plan.factor_frame, plan.factor_index = frame.to(v.device), rows.to(v.device)


# ------------------------------------------------------------------ every call


@torch.no_grad()
def term_norms(
    uses: list[Use],
    confirmed: Mapping[int, Mapping[int, tuple[Tensor, UsePlan]]],
    params: Mapping[str, Tensor],
    n: int,
    workspace: dict[tuple, Tensor] | None = None,
) -> Tensor:
    """``Σ_c Σ_params ‖∂r_n[c]/∂p‖²`` of one term from its uses' gradients and plans.

    Args:
        uses: The recorded uses.
        confirmed: Component ``c`` → use index → (gradient of ``Σ_n r_n[c]`` at the use's output, plan).
        params: The trainable parameters by name.
        n: The term's point count.
        workspace: Buffers for the stacked factors and their Gram products, kept from call to call
            (same shapes for the same layout), so that a warm call writes into memory it already has
            instead of faulting in fresh pages for every large temporary; ``None``: fresh buffers.
    """
    accs = _accumulate(uses, confirmed, params, n, workspace)
    if not accs:
        return next(iter(params.values())).new_zeros(n)
    return sum_all([acc.squared_norms(n) for acc in accs.values()])


@torch.no_grad()
def term_jacobian(
    uses: list[Use],
    confirmed: Mapping[int, Mapping[int, tuple[Tensor, UsePlan]]],
    params: Mapping[str, Tensor],
    n: int,
    workspace: dict[tuple, Tensor] | None = None,
) -> Tensor:
    """The rows of one term's Jacobian, ``(N, C, P)``: ``∂r_n[c]/∂θ`` over ``params`` in their order.

    The same factors as :func:`term_norms`, summed into each point's gradient instead of squared: per
    parameter and component ``Σ_k x_{n,k} ⊗ y_{n,k}`` plus the dense part. ``workspace`` is not used:
    its buffers are shared between components and parameters, and every gradient here is kept.
    """
    del workspace
    first = next(iter(params.values()))
    components = max(confirmed, default=-1) + 1
    sizes = [p.numel() for p in params.values()]
    out = first.new_zeros(n, components, sum(sizes))
    offsets = dict(zip(params, torch.tensor([0, *sizes]).cumsum(0).tolist(), strict=False))
    for name, acc in _accumulate(uses, confirmed, params, n, None).items():
        start = offsets[name]
        for c, grad in acc.per_point_gradients(n).items():
            out[:, c, start : start + grad.shape[1]] = grad
    return out


def _accumulate(
    uses: list[Use],
    confirmed: Mapping[int, Mapping[int, tuple[Tensor, UsePlan]]],
    params: Mapping[str, Tensor],
    n: int,
    workspace: dict[tuple, Tensor] | None,
) -> dict[str, Accumulator]:
    """Every parameter's per-point gradient pieces from its uses' gradients and plans."""
    accs: dict[str, Accumulator] = {}
    for c, per_use in confirmed.items():
        for i, (grad, plan) in per_use.items():
            use = uses[i]
            p = params[use.name]
            acc = _accumulator(accs, use.name, p, workspace)
            if use.kind is UseKind.ELEMENTWISE:
                _add_elementwise_use(acc, c, use, grad, plan, n)
                continue
            _add_matrix_use(acc, c, use, grad, plan, n)
            if use.factor is not None:
                s_acc = _accumulator(accs, use.factor.name, params[use.factor.name], workspace)
                _factorize_last(acc, s_acc, c, use, plan, p)
    return accs


def _accumulator(
    accs: dict[str, Accumulator], name: str, p: Tensor, workspace: dict[tuple, Tensor] | None
) -> Accumulator:
    """The accumulator of parameter ``name``, built on its first use only (``setdefault`` would build one
    for every use of every warm call and throw it away)."""
    acc = accs.get(name)
    if acc is None:
        acc = accs[name] = Accumulator(name, tuple(p.shape), p.dtype, workspace)
    return acc


def _promoted(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Factors recorded under autocast are promoted to the parameter's dtype; most already have it, and a
    # dtype comparison costs a tenth of a call to `to` on every factor of every warm call.
    return t if t.dtype == dtype else t.to(dtype)


def _use_major(points_first: Tensor, n: int) -> Tensor:
    """``(N, …, w)`` as ``(R, N, w)``: a point's rows as ``R`` blocks of all points; one row per point
    (the common case) stays ``(N, w)``, with no view op (each is a dispatch on every warm call)."""
    if points_first.ndim == 2:
        return points_first
    return points_first.reshape(n, -1, points_first.shape[-1]).transpose(0, 1)


def _add_matrix_use(acc: Accumulator, c: int, use: Use, grad: Tensor, plan: UsePlan, n: int) -> None:
    other = use.other
    if use.kind is UseKind.LEFT:  # Y = P R  ⇔  Yᵀ = Rᵀ Pᵀ: the right case on transposes
        other, grad = other.transpose(-1, -2), grad.transpose(-1, -2)
    layout = plan.layout
    if other.shape[:-1] != grad.shape[:-1]:
        other = other.expand(*grad.shape[:-1], other.shape[-1])
    rows_other = _promoted(_use_major(layout.points_first(other, n), n), acc.dtype)
    rows_grad = _promoted(_use_major(layout.points_first(grad, n), n), acc.dtype)
    if use.scale != 1.0:
        rows_other = rows_other * use.scale
    if plan.same:  # ∂/∂P = l ⊗ g with P ≅ W
        acc.add_factors(c, rows_other, rows_grad)
    else:
        acc.add_factors(c, rows_grad, rows_other)


def _factorize_last(acc: Accumulator, s_acc: Accumulator, c: int, use: Use, plan: UsePlan, v: Tensor) -> None:
    """Turn the factors just added for ``Q = exp(S) ⊙ V`` into those of ``V`` and ``S``.

    With ``∂r_n/∂Q = Σ_k u_k ⊗ w_k`` (``u`` over the rows of ``V``, ``w`` over its columns) and ``F =
    exp(S[index])`` constant along one axis of ``V`` (a scale per row or per column, as in random weight
    factorization), the chain rule gives

        ∂r_n/∂V = F ⊙ ∂r_n/∂Q          (scale ``u`` by the row factor, or ``w`` by the column factor),
        ∂r_n/∂S = Σ_{entries with that s} (∂r_n/∂Q) ⊙ Q = Σ_k u_k ⊙ (Q w_k)   (rows; columns likewise),

    so ``V`` keeps rank-one factors and ``S`` gets a dense per-point gradient of ``S``'s size. The same
    holds for any weight ``diag(f(s)) V`` or ``V diag(f(s))`` with ``f`` elementwise (``∂Q/∂s = f'(s) V``);
    ``exp`` is the one recognized.
    """
    values = use.factor.values.reshape(-1, *use.factor.values.shape[-2:])[0].reshape(-1)
    factor = values.new_empty(v.numel())
    factor[plan.factor_frame] = values
    factor = factor.view(v.shape)
    q = (factor * v.detach()).to(acc.dtype)
    u, w = blocks(acc.xs[c][-1]), blocks(acc.ys[c][-1])
    if plan.factor_along == 0:
        scale = factor[:, 0].to(acc.dtype)
        grad_s = (u * (w @ q.T)).sum(0)  # Σ_k u_k ⊙ (Q w_k), (N, rows of V)
        acc.xs[c][-1] = u * scale
    else:
        scale = factor[0, :].to(acc.dtype)
        grad_s = (w * (u @ q)).sum(0)  # Σ_k w_k ⊙ (Qᵀ u_k), (N, columns of V)
        acc.ys[c][-1] = w * scale
    s_numel = math.prod(s_acc.shape)
    s_acc.add_dense(c, grad_s.new_zeros(grad_s.shape[0], s_numel).index_add_(1, plan.factor_index, grad_s))


def _add_elementwise_use(acc: Accumulator, c: int, use: Use, grad: Tensor, plan: UsePlan, n: int) -> None:
    contribution = grad if use.other is None else grad * use.other
    if contribution.shape != grad.shape:
        contribution = contribution.expand(grad.shape)
    per_point = _promoted(plan.layout.points_first(contribution, n).reshape(n, -1), acc.dtype)
    if plan.identity:
        acc.add_dense(c, per_point if use.scale == 1.0 else per_point * use.scale)
        return
    dense = per_point.new_zeros(n, math.prod(acc.shape)).index_add_(1, plan.flat_index, per_point)
    acc.add_dense(c, dense if use.scale == 1.0 else dense * use.scale)

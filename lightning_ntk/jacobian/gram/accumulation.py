"""Per-point squared norms from the recorded factors: the per-layer Gram identities.

For a weight ``W`` with uses ``k``, the gradient of row ``n`` is ``∂r_n/∂W = Σ_k x_{n,k} ⊗ y_{n,k}``
(``x`` over the rows of ``W``, ``y`` over its columns; one of them is the other operand's row, the
other the gradient of ``Σ_n r_n`` with respect to that row of the product's output), so

    ‖∂r_n/∂W‖² = Σ_{k,k'} (x_{n,k}·x_{n,k'}) (y_{n,k}·y_{n,k'}) = Σ ((X_n X_nᵀ) ⊙ (Y_n Y_nᵀ))

with ``X_n``, ``Y_n`` the factors of all uses stacked: two batched products per weight, whatever the
number of uses, and one more batch dimension for the output components of a point. Where forming
``∂r_n/∂W`` itself is cheaper (thin layers) or a use is elementwise (a bias: a dense per-point
gradient), the gradient is formed and squared.

:func:`plan_use` works out once per module and batch signature what a use needs on every call
(orientation, index maps on the device); :func:`term_norms` does the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

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
    return _sum([acc.squared_norms(n) for acc in accs.values()])


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
) -> dict[str, _Accumulator]:
    """Every parameter's per-point gradient pieces from its uses' gradients and plans."""
    accs: dict[str, _Accumulator] = {}
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
    accs: dict[str, _Accumulator], name: str, p: Tensor, workspace: dict[tuple, Tensor] | None
) -> _Accumulator:
    """The accumulator of parameter ``name``, built on its first use only (``setdefault`` would build one
    for every use of every warm call and throw it away)."""
    acc = accs.get(name)
    if acc is None:
        acc = accs[name] = _Accumulator(name, tuple(p.shape), p.dtype, workspace)
    return acc


@dataclass
class _Accumulator:
    """Per-point gradient pieces of one parameter, per output component: rank-one factors (``x`` over
    the parameter's rows, ``y`` over its columns; each use's as ``(R, N, ·)``, its ``R`` rows per point
    as blocks of all points, or ``(N, ·)`` with one row per point) and a dense part."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the parameter's: factors recorded in lower precision (autocast) are promoted
    workspace: dict[tuple, Tensor] | None
    xs: dict[int, list[Tensor]] = field(default_factory=dict)
    ys: dict[int, list[Tensor]] = field(default_factory=dict)
    dense: dict[int, Tensor] = field(default_factory=dict)

    def add_factors(self, c: int, x: Tensor, y: Tensor) -> None:
        self.xs.setdefault(c, []).append(x)
        self.ys.setdefault(c, []).append(y)

    def add_dense(self, c: int, values: Tensor) -> None:
        self.dense[c] = values if c not in self.dense else self.dense[c] + values

    def buffer(self, role: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if self.workspace is None:
            return like.new_empty(shape)
        key = (self.name, role, shape, like.dtype, like.device)
        buf = self.workspace.get(key)
        if buf is None:
            buf = self.workspace[key] = like.new_empty(shape)
        return buf

    def stacked(self, role: str, factors: list[Tensor], n: int) -> Tensor:
        """``(N, R, ·)``: every use's factors side by side for each point."""
        rows = sum(_rows(f) for f in factors)
        out = self.buffer(role, (n, rows, factors[0].shape[-1]), factors[0])
        return torch.cat([f.unsqueeze(1) if f.ndim == 2 else f.transpose(0, 1) for f in factors], 1, out=out)

    def stacked_by_use(self, role: str, factors: dict[int, list[Tensor]], components: list[int], n: int) -> Tensor:
        """``(C, R, N, ·)``: every use's factors one block after another, per component. Seen as
        ``(N, R, ·)`` per component, this layout is faster to multiply on a CPU than one stacked along
        the rows of each point (each use's rows are copied as one block, and the product reads them
        as such)."""
        first = factors[components[0]][0]
        rows = sum(_rows(f) for f in factors[components[0]])
        out = self.buffer(role + "_by_use", (len(components), rows, n, first.shape[-1]), first)
        for k, c in enumerate(components):
            if all(f.ndim == 2 for f in factors[c]):
                torch.stack(factors[c], 0, out=out[k])
            else:
                torch.cat([_blocks(f) for f in factors[c]], 0, out=out[k])
        return out

    def per_point_gradients(self, n: int) -> dict[int, Tensor]:
        """Component → ``∂r_n[c]/∂p`` for every point, ``(N, numel)`` in the parameter's element order."""
        out = {}
        for c in sorted(set(self.xs) | set(self.dense)):
            full = self.dense.get(c)
            if c in self.xs:
                x, y = self.stacked("x", self.xs[c], n), self.stacked("y", self.ys[c], n)
                outer = torch.bmm(x.transpose(1, 2), y).view(n, -1)  # Σ_k x_k ⊗ y_k as (N, a·b)
                full = outer if full is None else full + outer
            out[c] = full
        return out

    def squared_norms(self, n: int) -> Tensor:
        if not self.xs:
            return _sum([_squared_norms(d, 1) for d in self.dense.values()])
        if not self.dense and all(len(xs) == 1 and _rows(xs[0]) == 1 for xs in self.xs.values()):
            # One row of one use per point and component (a network evaluated once on the term's points):
            # ‖x ⊗ y‖² = ‖x‖² ‖y‖², from the factors as they are (no stacking, no outer product).
            total = None
            for c in sorted(self.xs):
                x, y = _single(self.xs[c][0]), _single(self.ys[c][0])
                norms = (torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)).square()
                total = norms if total is None else total + norms
            return total
        components = sorted(set(self.xs) | set(self.dense))
        a, b = self.xs[components[0]][0].shape[-1], self.ys[components[0]][0].shape[-1]
        rows = max(sum(_rows(x) for x in xs) for xs in self.xs.values())
        if self.dense or a * b <= rows * (a + b):  # forming ∂r_n/∂W is cheaper (thin layers)
            total = None
            for c in components:
                full = self.dense.get(c)
                if c in self.xs:
                    outer = self.thin_sum(c) if a == 1 or b == 1 else None
                    if outer is None:
                        x, y = self.stacked("x", self.xs[c], n), self.stacked("y", self.ys[c], n)
                        outer = self.outer_sum(x, y, ordered=full is not None)
                    full = outer if full is None else full + outer
                norms = _squared_norms(full, 1)
                total = norms if total is None else total + norms
            return total
        # One Gram product per side and component for all uses: (N, R, a) and (N, R, b).
        shapes = {tuple(_rows(x) for x in self.xs[c]) for c in components}
        groups = [components] if len(shapes) == 1 else [[c] for c in components]
        total = None
        for group in groups:
            x, y = self.stacked_by_use("x", self.xs, group, n), self.stacked_by_use("y", self.ys, group, n)
            r = x.shape[1]
            if r == 1:  # one row per point: ‖x ⊗ y‖² = ‖x‖² ‖y‖²
                norms = (_squared_norms(x, (1, 3)) * _squared_norms(y, (1, 3))).sum(0)
                total = norms if total is None else total + norms
                continue
            gram_x = self.buffer("gram_x", (len(group), n, r, r), x)
            gram_y = self.buffer("gram_y", (len(group), n, r, r), y)
            for k in range(len(group)):
                xk, yk = x[k].transpose(0, 1), y[k].transpose(0, 1)
                torch.bmm(xk, xk.transpose(1, 2), out=gram_x[k])
                torch.bmm(yk, yk.transpose(1, 2), out=gram_y[k])
            norms = gram_x.mul_(gram_y).sum((0, 2, 3))
            total = norms if total is None else total + norms
        return total

    def thin_sum(self, c: int) -> Tensor | None:
        """``Σ_k x_k ⊗ y_k`` per point as ``(N, a·b)`` for a parameter with one row or one column, from the
        factors as they are when each use has one row per point (``None`` otherwise): one multiply-add per
        use instead of stacking every use's factors first."""
        pairs = list(zip(self.xs[c], self.ys[c], strict=True))
        if any(_rows(x) != 1 for x, _ in pairs):
            return None
        full = _single(pairs[0][0]) * _single(pairs[0][1])  # (N, a) ⊙ (N, b), one of them of width 1
        for x, y in pairs[1:]:
            # Not in place: a gradient autograd returns as a ZeroTensor (torch ≥ 2.15) makes the product one,
            # and ZeroTensors are immutable.
            full = torch.addcmul(full, _single(x), _single(y))
        return full

    def outer_sum(self, x: Tensor, y: Tensor, ordered: bool) -> Tensor:
        """``Σ_k x_k ⊗ y_k`` per point, flattened to ``(N, a·b)``: in the parameter's ``(a, b)`` order
        if ``ordered`` (it is added to a dense part), otherwise in whichever order is faster."""
        n, r, a = x.shape
        b = y.shape[2]
        # A batched matmul with a dimension of 1 runs one tiny product per point; broadcasting is faster.
        if r == 1:
            return torch.mul(x.transpose(1, 2), y, out=self.buffer("outer", (n, a, b), x)).view(n, -1)
        if a == 1 or b == 1:
            return (x * y).sum(1)
        if ordered or b >= a:
            return torch.bmm(x.transpose(1, 2), y, out=self.buffer("outer", (n, a, b), x)).view(n, -1)
        # The same entries transposed: a thin first factor is several times faster on a CPU.
        return torch.bmm(y.transpose(1, 2), x, out=self.buffer("outer", (n, b, a), x)).view(n, -1)


def _sum(parts: list[Tensor]) -> Tensor:
    """The sum of same-shaped tensors: one stack and one reduction instead of an add per part (``stack``
    promotes parts of several dtypes, as from parameters of several dtypes, like the adds did)."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def _squared_norms(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    # A norm reduces without materializing the squares (twice as fast on a CPU for large rows).
    return torch.linalg.vector_norm(t, dim=dim).square()


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


def _rows(factor: Tensor) -> int:
    """Rows per point of a factor: ``(N, w)`` has one, ``(R, N, w)`` has ``R``."""
    return 1 if factor.ndim == 2 else factor.shape[0]


def _single(factor: Tensor) -> Tensor:
    """The ``(N, w)`` of a factor with one row per point."""
    return factor if factor.ndim == 2 else factor[0]


def _blocks(factor: Tensor) -> Tensor:
    """A factor as ``(R, N, w)``."""
    return factor.unsqueeze(0) if factor.ndim == 2 else factor


def _add_matrix_use(acc: _Accumulator, c: int, use: Use, grad: Tensor, plan: UsePlan, n: int) -> None:
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


def _factorize_last(acc: _Accumulator, s_acc: _Accumulator, c: int, use: Use, plan: UsePlan, v: Tensor) -> None:
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
    u, w = _blocks(acc.xs[c][-1]), _blocks(acc.ys[c][-1])
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


def _add_elementwise_use(acc: _Accumulator, c: int, use: Use, grad: Tensor, plan: UsePlan, n: int) -> None:
    contribution = grad if use.other is None else grad * use.other
    if contribution.shape != grad.shape:
        contribution = contribution.expand(grad.shape)
    per_point = _promoted(plan.layout.points_first(contribution, n).reshape(n, -1), acc.dtype)
    if plan.identity:
        acc.add_dense(c, per_point if use.scale == 1.0 else per_point * use.scale)
        return
    dense = per_point.new_zeros(n, math.prod(acc.shape)).index_add_(1, plan.flat_index, per_point)
    acc.add_dense(c, dense if use.scale == 1.0 else dense * use.scale)

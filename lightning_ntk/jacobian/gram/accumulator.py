"""One parameter's per-point gradient pieces, and the arithmetic on them: the per-layer Gram identities.

For a weight ``W`` with uses ``k``, the gradient of row ``n`` is ``∂r_n/∂W = Σ_k x_{n,k} ⊗ y_{n,k}``
(``x`` over the rows of ``W``, ``y`` over its columns; one of them is the other operand's row, the
other the gradient of ``Σ_n r_n`` with respect to that row of the product's output), so

    ‖∂r_n/∂W‖² = Σ_{k,k'} (x_{n,k}·x_{n,k'}) (y_{n,k}·y_{n,k'}) = Σ ((X_n X_nᵀ) ⊙ (Y_n Y_nᵀ))

with ``X_n``, ``Y_n`` the factors of all uses stacked: two batched products per weight, whatever the
number of uses, and one more batch dimension for the output components of a point. Where forming
``∂r_n/∂W`` itself is cheaper (thin layers) or a use is elementwise (a bias: a dense per-point
gradient), the gradient is formed and squared. :class:`Accumulator` holds the pieces
(:mod:`~lightning_ntk.jacobian.gram.accumulation` fills it from the uses' gradients) and does this arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Accumulator", "blocks", "norms_squared", "rows_per_point", "single", "sum_all"]


@dataclass
class Accumulator:
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
        rows = sum(rows_per_point(f) for f in factors)
        out = self.buffer(role, (n, rows, factors[0].shape[-1]), factors[0])
        return torch.cat([f.unsqueeze(1) if f.ndim == 2 else f.transpose(0, 1) for f in factors], 1, out=out)

    def stacked_by_use(self, role: str, factors: dict[int, list[Tensor]], components: list[int], n: int) -> Tensor:
        """``(C, R, N, ·)``: every use's factors one block after another, per component. Seen as
        ``(N, R, ·)`` per component, this layout is faster to multiply on a CPU than one stacked along
        the rows of each point (each use's rows are copied as one block, and the product reads them
        as such)."""
        first = factors[components[0]][0]
        rows = sum(rows_per_point(f) for f in factors[components[0]])
        out = self.buffer(role + "_by_use", (len(components), rows, n, first.shape[-1]), first)
        for k, c in enumerate(components):
            if all(f.ndim == 2 for f in factors[c]):
                torch.stack(factors[c], 0, out=out[k])
            else:
                torch.cat([blocks(f) for f in factors[c]], 0, out=out[k])
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
            return sum_all([norms_squared(d, 1) for d in self.dense.values()])
        if not self.dense and all(len(xs) == 1 and rows_per_point(xs[0]) == 1 for xs in self.xs.values()):
            # One row of one use per point and component (a network evaluated once on the term's points):
            # ‖x ⊗ y‖² = ‖x‖² ‖y‖², from the factors as they are (no stacking, no outer product).
            total = None
            for c in sorted(self.xs):
                x, y = single(self.xs[c][0]), single(self.ys[c][0])
                norms = (torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)).square()
                total = norms if total is None else total + norms
            return total
        components = sorted(set(self.xs) | set(self.dense))
        a, b = self.xs[components[0]][0].shape[-1], self.ys[components[0]][0].shape[-1]
        rows = max(sum(rows_per_point(x) for x in xs) for xs in self.xs.values())
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
                norms = norms_squared(full, 1)
                total = norms if total is None else total + norms
            return total
        # One Gram product per side and component for all uses: (N, R, a) and (N, R, b).
        shapes = {tuple(rows_per_point(x) for x in self.xs[c]) for c in components}
        groups = [components] if len(shapes) == 1 else [[c] for c in components]
        total = None
        for group in groups:
            x, y = self.stacked_by_use("x", self.xs, group, n), self.stacked_by_use("y", self.ys, group, n)
            r = x.shape[1]
            if r == 1:  # one row per point: ‖x ⊗ y‖² = ‖x‖² ‖y‖²
                norms = (norms_squared(x, (1, 3)) * norms_squared(y, (1, 3))).sum(0)
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
        if any(rows_per_point(x) != 1 for x, _ in pairs):
            return None
        full = single(pairs[0][0]) * single(pairs[0][1])  # (N, a) ⊙ (N, b), one of them of width 1
        for x, y in pairs[1:]:
            # Not in place: a gradient autograd returns as a ZeroTensor (torch ≥ 2.15) makes the product one,
            # and ZeroTensors are immutable.
            full = torch.addcmul(full, single(x), single(y))
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


def sum_all(parts: list[Tensor]) -> Tensor:
    """The sum of same-shaped tensors: one stack and one reduction instead of an add per part (``stack``
    promotes parts of several dtypes, as from parameters of several dtypes, like the adds did)."""
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)


def norms_squared(t: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    # A norm reduces without materializing the squares (twice as fast on a CPU for large rows).
    return torch.linalg.vector_norm(t, dim=dim).square()


def rows_per_point(factor: Tensor) -> int:
    """Rows per point of a factor: ``(N, w)`` has one, ``(R, N, w)`` has ``R``."""
    return 1 if factor.ndim == 2 else factor.shape[0]


def single(factor: Tensor) -> Tensor:
    """The ``(N, w)`` of a factor with one row per point."""
    return factor if factor.ndim == 2 else factor[0]


def blocks(factor: Tensor) -> Tensor:
    """A factor as ``(R, N, w)``."""
    return factor.unsqueeze(0) if factor.ndim == 2 else factor

"""Exact per-point squared Jacobian norms from Gram identities over recorded parameter uses.

Every use ``k`` of a weight matrix ``W`` in the computation of the residuals — the forward matmuls,
and the matmuls that the double backward of ``torch.autograd.grad(..., create_graph=True)`` or a
forward-mode ``jvp`` runs with ``W`` or ``Wᵀ`` — is a product whose rows (or batch entries) belong
to points. For a residual whose row ``n`` depends on point ``n`` only, the gradient of ``r_n`` is a
sum of rank-one terms, one per row ``k`` of point ``n`` over all uses,

    ∂r_n/∂W = Σ_k u_{n,k} ⊗ v_{n,k}   ⇒   ‖∂r_n/∂W‖² = Σ_{k,k'} (u_{n,k}·u_{n,k'}) (v_{n,k}·v_{n,k'}),

where one factor is the other operand's row and the other is the gradient of ``Σ_n r_n`` with
respect to that row of the product's output. A parameter broadcast over points in an elementwise op
(a bias, an adaptive activation slope) contributes ``Σ_k g_{n,k} ⊙ ∂y/∂p`` reduced to its shape.
So one recorded residual evaluation and one backward of ``Σ_n r_n`` per output component give every
per-point norm without forming a per-point gradient: about one training step.

The uses are recorded by a ``TorchDispatchMode`` that follows every tensor aliasing a trainable
parameter (views, copies, scalings) by an index map into the parameter. Which axis of a product's
output holds the points is inferred from shapes and confirmed once, per module and batch layout, by a
second backward with random per-point seeds: the gradient of ``Σ_n w_n r_n`` must equal ``w_n``
times that of ``Σ_n r_n`` on every row of point ``n``. One weight built from two parameters is
modelled: random weight factorization, ``W = diag(exp(s)) V`` or ``V diag(exp(s))`` (a scale per row
or per column), by the chain rule through the elementwise map (:func:`_factorize_last`). A use this
module does not model (an op it does not know, another weight built from parameters, rows that mix
points, a parameter on the side of a product whose rows are not points) raises
:class:`GramUnsupported` with the reason, and the caller falls back to a per-point path.

Invariants (each checked where it is named):

1. Row ``n`` of a term depends on point ``n`` only, or the whole batch is the term's one point.
   Confirmed per use by the seeded backward (:func:`_choose_layout`), and per term once per module
   and batch layout by the dispatcher's comparison with a per-point path on three points
   (``_cross_check`` in :mod:`lightning_ntk.jacobian.dispatch`); a term that fails either takes a
   per-point path alone, the others stay here.
2. Every parameter use is recorded: the recorder follows each tensor aliasing a parameter by an index
   map (views, copies, scalings) and raises :class:`GramUnsupported` — for every term, since the
   recording is shared — on a use it cannot model. Uses it cannot see (inside a custom
   ``autograd.Function``) are caught by the three-point comparison of invariant 1.
3. Index maps live on the CPU, so reading them never waits for the device.
4. Confirmed layouts are cached per module and batch signature together with the fingerprint of the
   uses (parameter, kind, output shape); a different fingerprint confirms them again.
5. Only a batch whose residuals are all finite confirms layouts; a non-finite point poisons its own
   rows, so its norm is NaN and every other point's and term's is unaffected.
6. Norms accumulate in the parameters' dtype (factors recorded under autocast are promoted).
7. An output of a product with a parameter that is modified in place invalidates the recording.
8. Nothing is written to ``param.grad``; results carry no graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_ntk.points import POINTWISE_RTOL

__all__ = [
    "ConfirmedLayouts",
    "GramResult",
    "GramUnsupported",
    "Split",
    "UseKey",
    "UseKind",
    "gram_squared_norms",
]

# A parameter whose uses need dense per-point gradients (elementwise uses) may take at most this
# many bytes of them; beyond, the caller falls back (or chunks the points).
_DENSE_BYTES = 1 << 29

# Ops whose output carries no derivative of their input's values.
_NO_DERIVATIVE = {
    "detach", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "eq", "ne", "lt", "le", "gt", "ge", "isnan", "isinf",
    "isfinite", "sign", "is_same_size", "_local_scalar_dense", "is_nonzero", "equal",
}  # fmt: skip
# Ops that copy values unchanged (same index map as their input).
_COPIES = {"clone", "_to_copy", "contiguous", "lift_fresh_copy"}
# Ops that copy values into a new shape.
_RESHAPES = {"_unsafe_view", "view_copy", "reshape"}


# ------------------------------------------------------------------ the entry point and its result


class GramUnsupported(Exception):
    """The residual uses a parameter in a way the Gram identities do not model."""


class UseKind(Enum):
    """How a recorded use applies a parameter ``P`` to a tensor whose rows belong to points."""

    RIGHT = "right"  # Y = L @ P
    LEFT = "left"  # Y = P @ R
    ELEMENTWISE = "elementwise"  # Y = P ⊙ other (broadcast over points), or P + other


class Split(Enum):
    """How the point axis of a tensor holds a term's ``N`` points."""

    POINT_MAJOR = "n"  # (…, N, S, …): each point's S rows together
    POINT_MINOR = "s"  # (…, S, N, …): S blocks of all N points
    BLOCK = "b"  # this term's N points as one block among other terms' rows


class UseKey(NamedTuple):
    """A confirmed layout is per term, output component of a point, and recorded use."""

    term: str
    component: int
    use: int


@dataclass
class ConfirmedLayouts:
    """What one module and batch layout confirmed: the uses it saw, their layouts, and the terms the
    identities do not cover (with the reason)."""

    fingerprint: tuple
    layouts: dict[UseKey, _Layout]
    unsupported: dict[str, str]


@dataclass
class GramResult:
    """What one Gram pass gives: norms of the terms it covers, and why it does not cover the others.

    Attributes:
        norms: term → per-point ``‖∂r_i(x_n)/∂θ‖²`` (summed over a point's rows), parameters' dtype.
        num_rows: term → residual entries, for every term.
        unsupported: term → the reason the identities do not cover it (rows that mix points, say).
    """

    norms: dict[str, Tensor]
    num_rows: dict[str, int]
    unsupported: dict[str, str]


@torch.enable_grad()  # the sums over points must join the graph even when the caller runs under no_grad
def gram_squared_norms(
    batch: object,
    params: Mapping[str, Tensor],
    residuals_fn: Callable[[object], Mapping[str, Tensor]],
    layouts: dict[tuple, ConfirmedLayouts],
    key: tuple,
    skip: frozenset[str] = frozenset(),
) -> GramResult:
    """Per-point ``‖∂r_i(x_n)/∂θ‖²`` (summed over a point's rows) and row counts, term by term.

    A term whose rows the identities do not cover (its rows mix points) is reported in
    ``unsupported`` and the other terms are still computed. Non-finite residual rows give non-finite
    norms at those points only; layouts chosen on such a batch are not cached.

    Args:
        batch: What ``residuals_fn`` takes.
        params: The trainable parameters by name.
        residuals_fn: Evaluates and checks the residuals.
        layouts: Confirmed layouts by batch signature (the module's
            :attr:`~lightning_ntk.memory.ModuleMemory.gram_layouts`).
        key: Cache key of this batch layout.
        skip: Terms not to compute (known to need another path).

    Raises:
        GramUnsupported: The residual uses a parameter in a way the identities do not cover, for
            every term (the recording is shared).
    """
    residuals, uses = _record_uses(params, residuals_fn, batch)
    rows = {term: r.numel() for term, r in residuals.items()}
    known = layouts.get(key)
    fingerprint = _fingerprint(uses)
    if known is not None and known.fingerprint != fingerprint:
        known = None
    chosen: dict[UseKey, _Layout] = {} if known is None else known.layouts
    unsupported: dict[str, str] = {} if known is None else dict(known.unsupported)
    outputs: list[Tensor] = []
    slot: dict[int, int] = {}
    for use in uses:
        if id(use.output) not in slot and use.output.requires_grad:
            slot[id(use.output)] = len(outputs)
            outputs.append(use.output)
    dtype = next(iter(params.values())).dtype
    seeds = torch.Generator(device="cpu").manual_seed(0)
    norms: dict[str, Tensor] = {}
    for term, r in residuals.items():
        if term in skip or term in unsupported:
            continue
        n = r.shape[0]
        flat = r.reshape(n, -1)
        weights = None if known is not None else (1 + torch.rand(n, generator=seeds, dtype=torch.float64)).to(flat)
        total = flat.new_zeros(n, dtype=dtype)
        try:
            for c in range(flat.shape[1]):
                grads = _grads(flat[:, c].sum(), outputs)
                seeded = None if weights is None else _grads((flat[:, c] * weights).sum(), outputs)
                confirmed = {}
                for i, use in enumerate(uses):
                    j = slot.get(id(use.output))
                    if j is None or grads[j] is None:
                        continue
                    use_key = UseKey(term, c, i)
                    if seeded is not None:
                        chosen[use_key] = _choose_layout(use, grads[j], seeded[j], weights, n)
                    if use_key not in chosen:  # a use whose gradient was zero when layouts were confirmed
                        raise GramUnsupported("the parameter uses changed since the layout was confirmed")
                    confirmed[i] = (grads[j], chosen[use_key])
                total = total + _component_norms(uses, confirmed, params, n)
        except GramUnsupported as err:
            unsupported[term] = str(err)
            continue
        norms[term] = total.detach()  # in the parameters' dtype
    # Rows that are not finite confirm nothing about the layout there: such a pass is not cached.
    if known is None and all(bool(torch.isfinite(r).all()) for r in residuals.values()):
        layouts[key] = ConfirmedLayouts(fingerprint, chosen, unsupported)
    return GramResult(norms, rows, unsupported)


# ------------------------------------------------------------------ recording the parameter uses


def _record_uses(
    params: Mapping[str, Tensor], residuals_fn: Callable[[object], Mapping[str, Tensor]], batch: object
) -> tuple[Mapping[str, Tensor], list[_Use]]:
    """One residual evaluation with its parameter uses recorded."""
    recorder = _Recorder(params)
    with recorder:
        residuals = residuals_fn(batch)
    rec = recorder.recording
    del recorder  # drop the alias table (and the tensors it keeps alive)
    if rec.unsupported is not None:
        raise GramUnsupported(rec.unsupported)
    for use in rec.uses:
        if use.output._version != use.version:
            raise GramUnsupported("the output of a product with a parameter was modified in place")
    return residuals, rec.uses


@dataclass
class _Alias:
    """A tensor equal to ``scale · P[index]``, ``scale · exp(P[index])`` (``exp``), or
    ``scale · exp(S[factor.index]) ⊙ P[index]`` (``factor``: a weight built from two parameters)."""

    name: str
    index: Tensor  # int64 on the CPU, same shape as the aliasing tensor: flat index into the parameter
    scale: float
    keep: Tensor  # keeps the tensor alive so that its id() stays unique while recording
    exp: bool = False
    factor: _Factor | None = None


@dataclass
class _Factor:
    """``exp(S[index])``, elementwise, of a weight ``W = exp(S) ⊙ V`` (random weight factorization)."""

    name: str  # S
    index: Tensor  # flat index into S, same shape as the weight
    values: Tensor  # exp(S[index]), same shape as the weight (detached)


@dataclass
class _Use:
    name: str
    kind: UseKind
    output: Tensor
    version: int
    index: Tensor  # index map of the parameter operand as used
    scale: float
    other: Tensor | None  # L, R, or the elementwise factor (None: factor 1)
    view_of_base: bool = False  # index is a view of the parameter's own arange (not of a copy)
    factor: _Factor | None = None  # the operand is exp(S) ⊙ P (matrix uses only)


@dataclass
class _Recording:
    uses: list[_Use] = field(default_factory=list)
    unsupported: str | None = None


def _scalar(value: object) -> float | None:
    """A Python number or 0-dim CPU tensor as float (no device sync); ``None`` otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Tensor) and value.ndim == 0 and value.device.type == "cpu" and not value.requires_grad:
        return float(value)
    return None


class _Recorder(TorchDispatchMode):
    """Follows every tensor that aliases a trainable parameter and records its uses in products."""

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.aliases: dict[int, _Alias] = {}
        self.bases: set[int] = set()
        for name, p in params.items():
            # Index maps live on the CPU whatever the device: checking them never waits for the GPU.
            index = torch.arange(p.numel()).view(p.shape)
            self.bases.add(index.untyped_storage().data_ptr())
            self.aliases[id(p)] = _Alias(name, index, 1.0, p)
        self.recording = _Recording()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self.recording
        if rec.unsupported is not None or not torch.is_grad_enabled():
            return out
        if not self._touches_alias(args) and not self._touches_alias(kwargs.values()):
            return out
        try:
            self._record(func, args, kwargs, out)
        except GramUnsupported as err:
            rec.unsupported = str(err)
        return out

    def _touches_alias(self, values) -> bool:
        # aten ops nest tensors at most one level deep (Tensor[] arguments); this runs for every op,
        # so it avoids the cost of a general pytree flatten.
        aliases = self.aliases
        for v in values:
            if isinstance(v, Tensor):
                if id(v) in aliases:
                    return True
            elif isinstance(v, (list, tuple)) and any(isinstance(t, Tensor) and id(t) in aliases for t in v):
                return True
        return False

    def _alias_args(self, args: tuple) -> list[int]:
        return [i for i, a in enumerate(args) if isinstance(a, Tensor) and id(a) in self.aliases]

    def _derive(self, out: Tensor, source: _Alias, index: Tensor, scale: float, factor: _Factor | None = None) -> None:
        factor = factor if factor is not None else source.factor
        self.aliases[id(out)] = _Alias(source.name, index, source.scale * scale, out, source.exp, factor)

    def _same_view(self, func, args: tuple, kwargs: dict, out: Tensor, name: str, index: Tensor) -> Tensor:
        """The view, copy or reshape ``func`` applied to another tensor shaped like its input."""
        if func.is_view:
            moved = func(index, *args[1:], **kwargs)
        else:
            moved = index.reshape(out.shape) if name in _RESHAPES else index
        return moved.expand(out.shape) if moved.shape != out.shape else moved

    def _record(self, func, args: tuple, kwargs: dict, out: object) -> None:
        name = func.overloadpacket.__name__
        if name in _NO_DERIVATIVE:
            return
        hits = self._alias_args(args)
        if not isinstance(out, Tensor) or any(isinstance(v, Tensor) and id(v) in self.aliases for v in kwargs.values()):
            raise GramUnsupported(f"a parameter is used by aten.{name} in a way the Gram path does not model")
        if not hits:  # the alias sits inside a list argument (cat, stack, ...)
            raise GramUnsupported(f"a parameter is an element of a list argument of aten.{name}")
        alias = self.aliases[id(args[hits[0]])]
        if func.is_view or name in _COPIES or name in _RESHAPES:
            if hits != [0]:
                raise GramUnsupported(f"aten.{name} takes a parameter in an unexpected position")
            index = self._same_view(func, args, kwargs, out, name, alias.index)
            factor = alias.factor
            if factor is not None:
                moved = self._same_view(func, args, kwargs, out, name, factor.index)
                values = self._same_view(func, args, kwargs, out, name, factor.values)
                factor = _Factor(factor.name, moved, values)
            self._derive(out, alias, index, 1.0, factor)
            return
        if name == "exp" and hits == [0] and not alias.exp and alias.factor is None and alias.scale == 1.0:
            self._derive(out, alias, alias.index, 1.0)
            self.aliases[id(out)].exp = True
            return
        if name == "mul" and len(hits) == 2:
            self._factorized(args, out)
            return
        if alias.exp or any(self.aliases[id(args[i])].exp for i in hits):
            raise GramUnsupported(f"exp of a parameter is used by aten.{name}; only exp(s) ⊙ V weights are modelled")
        if alias.factor is not None and name not in ("mm", "bmm", "addmm", "mul", "div", "neg"):
            raise GramUnsupported(f"a weight built from parameters is used by aten.{name}")
        if name == "addmm" and hits in ([0], [1], [2], [0, 1], [0, 2]):  # bias + (L @ P or P @ R)
            beta, alpha = float(kwargs.get("beta", 1)), float(kwargs.get("alpha", 1))
            if hits[0] == 0:
                self._elementwise(out, alias, beta, None)
            if hits[-1] > 0:
                self._matrix(args[1:], hits[-1] - 1, out, self.aliases[id(args[hits[-1]])], alpha)
            return
        if len(hits) > 1:
            raise GramUnsupported(f"aten.{name} combines two parameter tensors (e.g. a weight built from parameters)")
        pos = hits[0]
        if name in ("mm", "bmm"):
            self._matrix(args, pos, out, alias, 1.0)
        elif name in ("mul", "div", "neg", "add", "sub"):
            self._pointwise(name, args, kwargs, pos, out, alias)
        else:
            raise GramUnsupported(f"a parameter is used by aten.{name}, which the Gram path does not model")

    def _pointwise(self, name: str, args: tuple, kwargs: dict, pos: int, out: Tensor, alias: _Alias) -> None:
        if name == "neg":
            self._derive(out, alias, alias.index, -1.0)
            return
        other = args[1 - pos] if len(args) > 1 else None
        alpha = float(kwargs.get("alpha", 1))
        if name in ("add", "sub"):
            factor = 1.0 if pos == 0 else (alpha if name == "add" else -alpha)
            if _scalar(other) is not None:
                self._derive(out, alias, alias.index, factor)  # a shift does not change the derivative
            else:
                self._elementwise(out, alias, factor, None)
            return
        if name == "div" and pos == 1:
            raise GramUnsupported("a parameter is used as a divisor")
        value = _scalar(other)
        if value is not None:
            self._derive(out, alias, alias.index, 1.0 / value if name == "div" else value)
        elif name == "mul":
            self._elementwise(out, alias, 1.0, other)
        else:
            raise GramUnsupported("a parameter is divided by a tensor")

    def _factorized(self, args: tuple, out: Tensor) -> None:
        """``exp(S) ⊙ V`` (random weight factorization): a weight built from two parameters."""
        first, second = self.aliases[id(args[0])], self.aliases[id(args[1])]
        scaling, weight = (first, second) if first.exp else (second, first)
        scaling_tensor = args[0] if first.exp else args[1]
        if not scaling.exp or weight.exp or weight.factor is not None or scaling.factor is not None:
            raise GramUnsupported("aten.mul combines two parameter tensors other than exp(s) ⊙ V")
        values = (scaling_tensor.detach() / scaling.scale).expand(out.shape)
        factor = _Factor(scaling.name, scaling.index.expand(out.shape), values)
        index = weight.index.expand(out.shape) if weight.index.shape != out.shape else weight.index
        self.aliases[id(out)] = _Alias(weight.name, index, scaling.scale * weight.scale, out, False, factor)

    def _elementwise(self, out: Tensor, alias: _Alias, factor: float, other: Tensor | None) -> None:
        if alias.factor is not None:
            raise GramUnsupported("a weight built from parameters is used elementwise")
        use = _Use(alias.name, UseKind.ELEMENTWISE, out, out._version, alias.index, alias.scale * factor, other)
        self.recording.uses.append(use)

    def _matrix(self, operands: tuple, pos: int, out: Tensor, alias: _Alias, factor: float) -> None:
        other = operands[1 - pos]
        kind = UseKind.RIGHT if pos == 1 else UseKind.LEFT
        base = alias.index.untyped_storage().data_ptr() in self.bases
        use = _Use(alias.name, kind, out, out._version, alias.index, alias.scale * factor, other, base, alias.factor)
        self.recording.uses.append(use)


def _fingerprint(uses: list[_Use]) -> tuple:
    return tuple((u.name, u.kind, tuple(u.output.shape)) for u in uses)


# ------------------------------------------------------------------ where the points sit


@dataclass(frozen=True)
class _Layout:
    """Where the points sit in a tensor along ``axis``.

    ``split``: :class:`Split` — ``POINT_MINOR`` (…, S, N, …) or ``POINT_MAJOR`` (…, N, S, …) when the
    axis holds ``S`` rows per point; ``BLOCK`` when it holds this term's points as one block at
    ``offset`` among other terms' rows (one network evaluation on the concatenation of several terms'
    points).
    """

    axis: int
    split: Split
    offset: int = 0

    def points_first(self, t: Tensor, n: int) -> Tensor:
        """``t`` as ``(N, rest...)`` with point ``p`` in row ``p``."""
        if self.split is Split.BLOCK:
            return t.narrow(self.axis, self.offset, n).movedim(self.axis, 0)
        if n == 1:
            return t.unsqueeze(0)
        size = t.shape[self.axis]
        shape = list(t.shape)
        if self.split is Split.POINT_MINOR:
            shape[self.axis : self.axis + 1] = [size // n, n]
            return t.reshape(shape).movedim(self.axis + 1, 0)
        shape[self.axis : self.axis + 1] = [n, size // n]
        return t.reshape(shape).movedim(self.axis, 0)


def _candidates(shape: tuple[int, ...], axes: range | list[int], n: int, fixed: Callable[[int], bool]) -> list[_Layout]:
    if n == 1:
        return [_Layout(0, Split.POINT_MAJOR)]
    out = []
    for axis in axes:
        size = shape[axis]
        if size % n or not fixed(axis):
            continue
        out.append(_Layout(axis, Split.POINT_MAJOR))
        if size != n:
            out.append(_Layout(axis, Split.POINT_MINOR))
    return out


def _broadcast_free(index: Tensor, shape: tuple[int, ...]) -> Callable[[int], bool]:
    """Whether the parameter operand is constant along an axis of the output (it is broadcast there)."""
    offset = len(shape) - index.ndim

    def fixed(axis: int) -> bool:
        a = axis - offset
        return a < 0 or index.shape[a] == 1 or index.stride(a) == 0

    return fixed


def _point_axes(use: _Use) -> tuple[list[int], Callable[[int], bool]]:
    """Axes of the output that may hold points, and whether the parameter is constant along each."""
    shape = tuple(use.output.shape)
    if use.kind is UseKind.ELEMENTWISE:
        return list(range(len(shape))), _broadcast_free(use.index, shape)
    # Products: the points are among the batch dims and the rows (right) or columns (left) of the
    # output, along which the parameter operand never varies.
    batch = len(shape) - 2
    lead = [*range(batch), batch if use.kind is UseKind.RIGHT else batch + 1]
    in_batch = _broadcast_free(use.index[..., 0, 0], shape[:batch])
    return lead, lambda axis: axis >= batch or in_batch(axis)


def _use_candidates(use: _Use, n: int, grad: Tensor) -> list[_Layout]:
    axes, fixed = _point_axes(use)
    out = _candidates(tuple(use.output.shape), axes, n, fixed)
    for axis in axes:
        size = grad.shape[axis]
        if size > n and fixed(axis):
            # A block of this term's points among other rows: it starts at the first row with a gradient.
            busy = grad.movedim(axis, 0).reshape(size, -1).abs().sum(1) > 0
            first = int(busy.nonzero()[0, 0]) if bool(busy.any()) else 0
            if first + n <= size:
                out.append(_Layout(axis, Split.BLOCK, first))
    return out


def _choose_layout(use: _Use, grad: Tensor, seeded: Tensor, weights: Tensor, n: int) -> _Layout:
    # A non-finite point poisons its own rows (0·NaN in the backward), never another point's: the
    # layout is decided on the finite rows, and the norms keep the NaN at that point only.
    grad, seeded = _finite_or_zero(grad), _finite_or_zero(seeded)
    scale = seeded.norm()
    for layout in _use_candidates(use, n, grad):
        g = layout.points_first(grad, n).reshape(n, -1)
        s = layout.points_first(seeded, n).reshape(n, -1)
        # Rounding leaves ~1e-7 (float32); a wrong layout ~0.2 (the seeds are uniform on [1, 2)). A
        # block must also hold all of the gradient: rows outside it belong to no point of this term.
        outside = (seeded.norm() ** 2 - s.norm() ** 2).clamp_min(0).sqrt() if layout.split is Split.BLOCK else 0.0
        if (s - weights[:, None] * g).norm() + outside <= POINTWISE_RTOL * scale:
            return layout
    raise GramUnsupported(
        f"the rows of an aten product on {use.name!r} do not map to the points of a term (rows mix points)"
    )


def _finite_or_zero(t: Tensor) -> Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


# ------------------------------------------------------------------ per-point norms from the factors


def _component_norms(
    uses: list[_Use], confirmed: dict[int, tuple[Tensor, _Layout]], params: Mapping[str, Tensor], n: int
) -> Tensor:
    """``Σ_params ‖∂r_n[c]/∂p‖²`` for one output component from the uses' gradients and layouts."""
    accs: dict[str, _Accumulator] = {}
    for i, (grad, layout) in confirmed.items():
        use = uses[i]
        p = params[use.name]
        acc = accs.setdefault(use.name, _Accumulator(tuple(p.shape), p.dtype))
        if use.kind is UseKind.ELEMENTWISE:
            _add_elementwise_use(acc, use, grad, layout, n, p.numel())
        else:
            _add_matrix_use(acc, use, grad, layout, n)
            if use.factor is not None:
                s = params[use.factor.name]
                s_acc = accs.setdefault(use.factor.name, _Accumulator(tuple(s.shape), s.dtype))
                _factorize_last(acc, s_acc, use, p, s.numel(), n)
    first = next(iter(params.values()))
    total = first.new_zeros(n)
    for acc in accs.values():
        total = total + acc.squared_norms(n)
    return total


@dataclass
class _Accumulator:
    """Per-point gradient pieces of one parameter: rank-one factors and a dense part."""

    shape: tuple[int, ...]
    dtype: torch.dtype  # the parameter's: factors recorded in lower precision (autocast) are promoted
    us: list[Tensor] = field(default_factory=list)
    vs: list[Tensor] = field(default_factory=list)
    dense: Tensor | None = None

    def add_dense(self, values: Tensor) -> None:
        self.dense = values if self.dense is None else self.dense + values

    def squared_norms(self, n: int) -> Tensor:
        if not self.us:
            return self.dense.square().sum(1)
        # Factors per use, (N, R_k, a) and (N, R_k, b): blockwise, no concatenated copy.
        a, b = self.us[0].shape[2], self.vs[0].shape[2]
        rows = sum(u.shape[1] for u in self.us)
        if self.dense is not None or a * b <= rows * (a + b):  # forming ∂r_n/∂W is cheaper (thin layers)
            full = self.dense
            for u, v in zip(self.us, self.vs, strict=True):
                outer = torch.bmm(u.transpose(1, 2), v).reshape(n, -1)
                full = outer if full is None else full + outer
            return full.square().sum(1)
        total = None
        for k, (uk, vk) in enumerate(zip(self.us, self.vs, strict=True)):
            for j in range(k + 1):
                uj, vj = self.us[j], self.vs[j]
                term = (torch.bmm(uk, uj.transpose(1, 2)) * torch.bmm(vk, vj.transpose(1, 2))).sum((1, 2))
                term = term if j == k else 2 * term
                total = term if total is None else total + term
        return total


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


def _add_matrix_use(acc: _Accumulator, use: _Use, grad: Tensor, layout: _Layout, n: int) -> None:
    other, index = use.other, use.index
    if use.kind is UseKind.LEFT:  # Y = P R  ⇔  Yᵀ = Rᵀ Pᵀ: the right case on transposes
        other, index, grad = other.transpose(-1, -2), index.transpose(-1, -2), grad.transpose(-1, -2)
        axis = layout.axis if layout.axis < grad.ndim - 2 else grad.ndim - 2
        layout = _Layout(axis, layout.split, layout.offset)
    same = _orientation(index, acc.shape, use.view_of_base)
    lead = grad.shape[:-1]
    other = other.expand(*lead, other.shape[-1])
    rows_other = layout.points_first(other, n).reshape(n, -1, other.shape[-1]).to(acc.dtype)
    rows_grad = layout.points_first(grad, n).reshape(n, -1, grad.shape[-1]).to(acc.dtype)
    if use.scale != 1.0:
        rows_other = rows_other * use.scale
    if same:  # ∂/∂P = l ⊗ g with P ≅ W
        acc.us.append(rows_other)
        acc.vs.append(rows_grad)
    else:
        acc.us.append(rows_grad)
        acc.vs.append(rows_other)


def _factorize_last(acc: _Accumulator, s_acc: _Accumulator, use: _Use, v: Tensor, s_numel: int, n: int) -> None:
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
    factor, index = _in_parameter_frame(use, v)
    if bool((factor == factor[:, :1]).all()) and bool((index == index[:, :1]).all()):
        along, scale, s_index = 0, factor[:, 0], index[:, 0]  # one factor per row of V
    elif bool((factor == factor[:1, :]).all()) and bool((index == index[:1, :]).all()):
        along, scale, s_index = 1, factor[0, :], index[0, :]  # one factor per column of V
    else:
        raise GramUnsupported("a weight exp(S) ⊙ V whose factor varies along both axes of V")
    q = (factor * v.detach()).to(acc.dtype)
    u, w = acc.us[-1], acc.vs[-1]
    scale = scale.to(acc.dtype)
    if along == 0:
        grad_s = (u * (w @ q.T)).sum(1)  # Σ_k u_k ⊙ (Q w_k), (N, rows of V)
        acc.us[-1] = u * scale
    else:
        grad_s = (w * (u @ q)).sum(1)  # Σ_k w_k ⊙ (Qᵀ u_k), (N, columns of V)
        acc.vs[-1] = w * scale
    dense = grad_s.new_zeros(n, s_numel).index_add_(1, s_index.to(grad_s.device), grad_s)
    s_acc.add_dense(dense)


def _in_parameter_frame(use: _Use, v: Tensor) -> tuple[Tensor, Tensor]:
    """The factor values and the index of ``S`` arranged like ``V`` itself (whatever view was used)."""
    flat = use.index.reshape(-1, *use.index.shape[-2:])[0].reshape(-1)
    values = use.factor.values.reshape(-1, *use.factor.values.shape[-2:])[0].reshape(-1)
    s_index = use.factor.index.reshape(-1, *use.factor.index.shape[-2:])[0].reshape(-1)
    factor = values.new_empty(v.numel())
    factor[flat.to(values.device)] = values
    index = torch.empty(v.numel(), dtype=torch.long)
    index[flat] = s_index
    return factor.view(v.shape), index.view(v.shape)


def _add_elementwise_use(acc: _Accumulator, use: _Use, grad: Tensor, layout: _Layout, n: int, numel: int) -> None:
    contribution = grad if use.other is None else grad * use.other
    contribution = contribution.expand(grad.shape)
    index = use.index.expand(grad.shape)
    per_point = layout.points_first(contribution, n).reshape(n, -1).to(acc.dtype)
    flat_index = layout.points_first(index, n)[0].reshape(-1).to(grad.device, non_blocking=True)
    if n * numel * grad.element_size() > _DENSE_BYTES:
        raise GramUnsupported("too many points for the dense per-point gradient of an elementwise parameter use")
    dense = per_point.new_zeros(n, numel).index_add_(1, flat_index, per_point)
    acc.add_dense(dense if use.scale == 1.0 else dense * use.scale)


def _grads(output: Tensor, inputs: list[Tensor]) -> tuple[Tensor | None, ...]:
    if not inputs or not output.requires_grad:
        return (None,) * len(inputs)
    return torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True)

"""Recording the parameter uses: one residual evaluation under a ``TorchDispatchMode`` that follows
every tensor aliasing a trainable parameter (views, copies, scalings) by an index map into the
parameter, and records each product or elementwise op that applies one to a tensor of points.

What it gives (:func:`record_uses`): the residuals, with their graph, and the list of :class:`Use`.
A use it cannot model raises :class:`GramUnsupported` with the reason.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Factor", "GramUnsupported", "Use", "UseKind", "evaluate_plainly", "fingerprint", "record_uses"]

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


class GramUnsupported(Exception):
    """The residual uses a parameter in a way the Gram identities do not model."""


class UseKind(Enum):
    """How a recorded use applies a parameter ``P`` to a tensor whose rows belong to points."""

    RIGHT = "right"  # Y = L @ P
    LEFT = "left"  # Y = P @ R
    ELEMENTWISE = "elementwise"  # Y = P ⊙ other (broadcast over points), or P + other


def record_uses(
    params: Mapping[str, Tensor], residuals_fn: Callable[[object], Mapping[str, Tensor]], batch: object
) -> tuple[Mapping[str, Tensor], list[Use]]:
    """One residual evaluation with its parameter uses recorded."""
    recorder = _Recorder(params)
    residuals = _without_dynamo()(recorder, residuals_fn, batch)
    rec = recorder.recording
    del recorder  # drop the alias table (and the tensors it keeps alive)
    if rec.unsupported is not None:
        raise GramUnsupported(rec.unsupported)
    for use in rec.uses:
        if use.output._version != use.version:
            raise GramUnsupported("the output of a product with a parameter was modified in place")
    return residuals, rec.uses


def evaluate_plainly(residuals_fn: Callable[[object], Mapping[str, Tensor]], batch: object) -> Mapping[str, Tensor]:
    """One residual evaluation as :func:`record_uses` makes it (TorchDynamo off around it, so nothing is
    compiled for it), without the recording."""
    return _without_dynamo()(contextlib.nullcontext(), residuals_fn, batch)


def _evaluate(recorder, residuals_fn: Callable[[object], Mapping[str, Tensor]], batch: object):
    with recorder:
        return residuals_fn(batch)


@functools.cache
def _without_dynamo() -> Callable:
    """:func:`_evaluate` with TorchDynamo off for the whole evaluation (imported on first use: it is
    slow to import). The recording needs eager aten ops anyway, and turning Dynamo off once here
    instead of around every dispatched op (the default of a ``TorchDispatchMode``) removes about half
    of the recorder's overhead per op."""
    return torch.compiler.disable(_evaluate, recursive=True)


@dataclass
class _Alias:
    """A tensor equal to ``scale · P[index]``, ``scale · exp(P[index])`` (``exp``), or
    ``scale · exp(S[factor.index]) ⊙ P[index]`` (``factor``: a weight built from two parameters)."""

    name: str
    index: Tensor  # int64 on the CPU, same shape as the aliasing tensor: flat index into the parameter
    scale: float
    keep: Tensor  # keeps the tensor alive so that its id() stays unique while recording
    exp: bool = False
    factor: Factor | None = None
    # Reached through an op whose effect on the derivative a later graph does not show: a scaling by a
    # tensor's value, or exp (a number saved with a graph node, a Python scalar, is shown).
    arithmetic: bool = False


@dataclass
class Factor:
    """``exp(S[index])``, elementwise, of a weight ``W = exp(S) ⊙ V`` (random weight factorization)."""

    name: str  # S
    index: Tensor  # flat index into S, same shape as the weight
    values: Tensor  # exp(S[index]), same shape as the weight (detached)


@dataclass
class Use:
    name: str
    kind: UseKind
    # The product's output; on a use found by a walk (:mod:`~.walking`), the edge of the node that
    # made it, and ``None`` where no gradient reaches it.
    output: Tensor | GradientEdge | None
    version: int
    index: Tensor | None  # index map of the parameter operand as used (None on a walked use)
    scale: float
    other: Tensor | None  # L, R, or the elementwise factor (None: factor 1)
    view_of_base: bool = False  # index is a view of the parameter's own arange (not of a copy)
    factor: Factor | None = None  # the operand is exp(S) ⊙ P (matrix uses only)
    # Every number applied to the parameter on its way here is a Python scalar (saved with a graph
    # node, so a later graph shows whether it changed), never a tensor's value or an exp.
    plain: bool = False


@dataclass
class _Recording:
    uses: list[Use] = field(default_factory=list)
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

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # Dynamo is off around the whole recording instead (_without_dynamo)

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

    def _derive(
        self,
        out: Tensor,
        source: _Alias,
        index: Tensor,
        scale: float,
        factor: Factor | None = None,
        arithmetic: bool = False,
    ) -> None:
        factor = factor if factor is not None else source.factor
        arithmetic = arithmetic or source.arithmetic
        self.aliases[id(out)] = _Alias(source.name, index, source.scale * scale, out, source.exp, factor, arithmetic)

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
                factor = Factor(factor.name, moved, values)
            self._derive(out, alias, index, 1.0, factor)
            return
        if name == "exp" and hits == [0] and not alias.exp and alias.factor is None and alias.scale == 1.0:
            self._derive(out, alias, alias.index, 1.0, arithmetic=True)
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
            scale = 1.0 / value if name == "div" else value
            self._derive(out, alias, alias.index, scale, arithmetic=isinstance(other, Tensor))
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
        factor = Factor(scaling.name, scaling.index.expand(out.shape), values)
        index = weight.index.expand(out.shape) if weight.index.shape != out.shape else weight.index
        self.aliases[id(out)] = _Alias(weight.name, index, scaling.scale * weight.scale, out, False, factor, True)

    def _elementwise(self, out: Tensor, alias: _Alias, factor: float, other: Tensor | None) -> None:
        if alias.factor is not None:
            raise GramUnsupported("a weight built from parameters is used elementwise")
        use = Use(alias.name, UseKind.ELEMENTWISE, out, out._version, alias.index, alias.scale * factor, other)
        use.plain = not alias.arithmetic
        self.recording.uses.append(use)

    def _matrix(self, operands: tuple, pos: int, out: Tensor, alias: _Alias, factor: float) -> None:
        other = operands[1 - pos]
        kind = UseKind.RIGHT if pos == 1 else UseKind.LEFT
        base = alias.index.untyped_storage().data_ptr() in self.bases
        use = Use(alias.name, kind, out, out._version, alias.index, alias.scale * factor, other, base, alias.factor)
        use.plain = not alias.arithmetic and alias.factor is None
        self.recording.uses.append(use)


def fingerprint(uses: list[Use]) -> tuple:
    """What the cached layouts and per-use constants depend on: parameter, kind, output shape, and the
    geometry of the parameter operand's index map (a square weight and its transpose differ only there)."""
    return tuple(
        (u.name, u.kind, tuple(u.output.shape), tuple(u.index.shape), u.index.stride(), u.index.storage_offset(),
         u.view_of_base, u.factor is not None)
        for u in uses
    )  # fmt: skip

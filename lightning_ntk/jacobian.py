"""Per-point squared norms of the residual Jacobian, ``‖∂r_i(x_n)/∂θ‖²``, in memory-bounded chunks.

These are the diagonal entries of each NTK block summed over a point's output components, so their
sum over points is the exact block trace ``Tr K_ii = ‖J_i‖_F²``. Three paths compute them, fastest
first; each term takes the first that applies:

``"vmap"``
    ``torch.func.vmap`` over points of ``jacrev`` of the per-point residual, in chunks of
    ``chunk_size`` points (memory ≈ chunk × rows-per-point × P floats). Needs a residual that runs
    under ``torch.func`` (input derivatives from :mod:`lightning_ntk.derivatives` or ``torch.func``).
``"loop"``
    One evaluation of the residuals per point with ``torch.autograd.grad`` per row: works with
    residuals in the ordinary autograd style (``requires_grad_`` + ``torch.autograd.grad``).
``"rows"``
    One VJP per residual row through the graph of the whole batch: needs nothing about how the
    batch is laid out, and is the slowest.

How the batch splits into points is inferred, not declared: a term with ``N`` rows (``shape[0]``)
is evaluated per point by slicing every tensor of the batch whose leading dimension is ``N``. Tensors
whose leading size is another term's point count are cut to their first row (they belong to the
other terms), everything else is passed whole. The per-point residual values are compared with the
full-batch values; if they differ (a residual that is not pointwise, or a batch layout the inference
got wrong) the next path is used, so a wrong split can cost time but never give a wrong trace.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_ntk.contract import check_batch_device, check_residuals, evaluate_residuals

__all__ = ["PointNorms", "ResidualCaller", "per_point_squared_norms", "trainable_parameters"]

# Per-chunk budget for the per-point Jacobian rows when `chunk_size` is not given. On CPU small
# chunks that stay in cache win (3x256 MLP, N=4096: 6.3 s with 16 points per chunk, 19 s with 256);
# on GPU large chunks keep the device busy.
_CPU_CHUNK_BYTES = 1 << 23
_GPU_CHUNK_BYTES = 1 << 30
_WARNED: set[tuple[type, tuple[str, ...], str]] = set()
# Per module and batch layout: whether the structured (Taylor-stream) path was checked and holds.
_STRUCTURED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]] = weakref.WeakKeyDictionary()


class _NotPointwise(Exception):
    """The per-point evaluation does not reproduce the full-batch residual."""


@dataclass(frozen=True)
class PointNorms:
    """Squared Jacobian norms per point for every term.

    Attributes:
        norms: term → tensor ``(N_i,)`` of ``Σ_rows-of-point ‖∂r/∂θ‖²``.
        num_rows: term → number of residual entries (rows of ``J_i``).
        paths: term → ``"vmap"``, ``"loop"`` or ``"rows"``.
    """

    norms: dict[str, Tensor]
    num_rows: dict[str, int]
    paths: dict[str, str]


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad=True``, tied ones once. Frozen parameters are not part of θ."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters; the NTK is empty.")
    return params


class ResidualCaller(nn.Module):
    # functional_call swaps parameters and calls forward(); residuals() is the function we need.
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, batch: object) -> Mapping[str, Tensor]:
        return self.inner.residuals(batch)


def _default_chunk_size(num_params: int, rows_per_point: int, itemsize: int, device: torch.device) -> int:
    budget = _CPU_CHUNK_BYTES if device.type == "cpu" else _GPU_CHUNK_BYTES
    return max(1, budget // (num_params * max(rows_per_point, 1) * itemsize))


class _PointSplit:
    """Builds the batch for a subset of the points of one group (terms with the same point count)."""

    def __init__(self, batch: object, size: int, other_sizes: set[int]) -> None:
        self.leaves, self.spec = tree_flatten(batch)
        self.size = size
        self.mapped = [isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == size for t in self.leaves]
        self.other = [
            isinstance(t, Tensor) and t.ndim > 0 and not m and t.shape[0] in other_sizes
            for t, m in zip(self.leaves, self.mapped, strict=True)
        ]

    @property
    def splittable(self) -> bool:
        return any(self.mapped)

    def mapped_leaves(self, index: Tensor | None = None) -> list[Tensor]:
        leaves = [t.detach() for t, m in zip(self.leaves, self.mapped, strict=True) if m]
        return leaves if index is None else [t[index.to(t.device)] for t in leaves]

    def build(self, points: Sequence[Tensor], shrink_others: bool, detach: bool) -> object:
        it = iter(points)
        leaves = []
        for leaf, mapped, other in zip(self.leaves, self.mapped, self.other, strict=True):
            if mapped:
                leaf = next(it)
            elif shrink_others and other:
                leaf = leaf[:1]
            if detach and isinstance(leaf, Tensor):
                leaf = leaf.detach()
            leaves.append(leaf)
        return tree_unflatten(leaves, self.spec)


def _check_values(name: str, got: Tensor, want: Tensor) -> None:
    want = want.detach().reshape(got.shape)
    scale = want.abs().nan_to_num(0.0, 0.0, 0.0).max().clamp_min(torch.finfo(want.dtype).tiny)
    if not torch.allclose(got, want, rtol=1e-3, atol=float(1e-4 * scale), equal_nan=True):
        raise _NotPointwise(f"per-point values of term {name!r} differ from the full-batch residual")


def _vmap_norms(
    module: nn.Module,
    split: _PointSplit,
    terms: list[str],
    reference: Mapping[str, Tensor],
    params: dict[str, Tensor],
    chunk_size: int,
    index: Tensor | None,
    shrink_others: bool,
) -> dict[str, Tensor]:
    caller = ResidualCaller(module)
    prefixed = {f"inner.{name}": p.detach() for name, p in params.items()}

    def outputs(p: dict[str, Tensor], *points: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        batch = split.build([x.unsqueeze(0) for x in points], shrink_others, detach=True)
        out = check_residuals(caller_call(p, batch), None, require_grad=False)
        rows = []
        for name in terms:
            r = out[name]
            if r.shape[0] != 1:
                raise _NotPointwise(f"term {name!r} keeps {r.shape[0]} rows when its points are split")
            rows.append(r.reshape(-1))
        rows_t = tuple(rows)
        return rows_t, tuple(r.detach() for r in rows_t)

    def caller_call(p: dict[str, Tensor], batch: object) -> Mapping[str, Tensor]:
        return functional_call(caller, p, (batch,))

    def per_point(*points: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        jac, values = jacrev(outputs, has_aux=True)(prefixed, *points)
        norms = tuple(sum(g.square().sum() for g in jt.values()) for jt in jac)
        return norms, values

    norms, values = vmap(per_point, chunk_size=chunk_size)(*split.mapped_leaves(index))
    for name, v in zip(terms, values, strict=True):
        _check_values(name, v, _select(reference[name], index))
    return dict(zip(terms, norms, strict=True))


def _row_norms(rows: Tensor, params: list[Tensor]) -> Tensor:
    total = rows.new_zeros(())
    if not rows.requires_grad:
        return total
    for k in range(rows.numel()):
        grads = torch.autograd.grad(rows[k], params, retain_graph=True, allow_unused=True)
        for g in grads:
            if g is not None:
                total = total + g.square().sum()
    return total


def _loop_norms(
    module: nn.Module,
    split: _PointSplit,
    terms: list[str],
    reference: Mapping[str, Tensor],
    params: dict[str, Tensor],
    index: Tensor | None,
    shrink_others: bool,
) -> dict[str, Tensor]:
    plist = list(params.values())
    norms: dict[str, list[Tensor]] = {name: [] for name in terms}
    leaves = [t for t, m in zip(split.leaves, split.mapped, strict=True) if m]
    for n in _point_ids(split.size, index):
        points = []
        for leaf in leaves:
            # A fresh leaf per point keeps the user's `requires_grad_` calls legal and local.
            p = leaf[n : n + 1].detach().clone()
            points.append(p.requires_grad_(leaf.requires_grad))
        out = evaluate_residuals(module, split.build(points, shrink_others, detach=False))
        for name in terms:
            r = out[name]
            if r.shape[0] != 1:
                raise _NotPointwise(f"term {name!r} keeps {r.shape[0]} rows when its points are split")
            _check_values(name, r.detach().reshape(-1), reference[name][n])
            norms[name].append(_row_norms(r.reshape(-1), plist).detach())
    return {name: torch.stack(v) for name, v in norms.items()}


def _rows_norms(
    reference: Mapping[str, Tensor], terms: list[str], params: dict[str, Tensor], index: Tensor | None
) -> dict[str, Tensor]:
    plist = list(params.values())
    out = {}
    for name in terms:
        r = reference[name]
        flat = r.reshape(r.shape[0], -1)
        out[name] = torch.stack([_row_norms(flat[n], plist).detach() for n in _point_ids(r.shape[0], index)])
    return out


def _select(values: Tensor, index: Tensor | None) -> Tensor:
    return values if index is None else values[index.to(values.device)]


def _point_ids(size: int, index: Tensor | None) -> list[int]:
    return list(range(size)) if index is None else index.tolist()


def _warn_once(module: nn.Module, terms: list[str], path: str, reason: str) -> None:
    key = (type(module), tuple(terms), path)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"NTK traces of term(s) {terms} of {type(module).__name__} use the slow {path!r} path because the "
        f"torch.func path failed ({reason}). For the fast path, write input derivatives with "
        "lightning_ntk.derivatives (partial, gradient, laplacian) or torch.func instead of "
        "torch.autograd.grad / requires_grad_, and keep row n of each residual a function of point n only.",
        stacklevel=4,
    )


def _structured_norms(
    module: nn.Module, batch: object, terms: Sequence[str] | None, chunk_size: int | None
) -> PointNorms | None:
    """The Gram-identity path of :mod:`lightning_ntk.taylor`, checked once per module and batch layout."""
    from lightning_ntk.points import batch_signature
    from lightning_ntk.taylor import structured_squared_norms

    signature = batch_signature(batch)
    verdicts = _STRUCTURED.setdefault(module, {})
    if verdicts.get(signature) is False:
        return None
    try:
        result = structured_squared_norms(module, batch, lambda b: check_residuals(module.residuals(b), terms))
    except (ValueError, TypeError):
        raise  # contract errors of the residuals: the user's to fix, shown as they are
    except RuntimeError:
        # e.g. streams recorded inside a torch.func transform the residual applied to the MLP
        result = None
    if result is None:
        verdicts[signature] = False
        return None
    norms, rows = result
    if signature not in verdicts:
        # The streams cannot prove that row n depends on point n only: compare a few points with
        # the general path once. A mismatch (a non-pointwise residual) means the general path.
        sizes = {v.shape[0] for v in norms.values()}
        probe = {n: torch.unique(torch.tensor([0, n // 2, n - 1])) for n in sizes}
        check = _generic_norms(module, batch, chunk_size=chunk_size, terms=terms, reference=None, indices=probe)
        for name, values in check.norms.items():
            want = norms[name][probe[norms[name].shape[0]].to(norms[name].device)]
            if not torch.allclose(values, want, rtol=1e-4, atol=1e-6 * float(want.abs().max().clamp_min(1e-30))):
                verdicts[signature] = False
                return None
        verdicts[signature] = True
    names = list(norms)
    return PointNorms(norms=norms, num_rows=rows, paths=dict.fromkeys(names, "structured"))


def per_point_squared_norms(
    module: nn.Module,
    batch: object,
    *,
    chunk_size: int | None = None,
    terms: Sequence[str] | None = None,
    reference: Mapping[str, Tensor] | None = None,
    indices: Mapping[int, Tensor] | None = None,
) -> PointNorms:
    """Exact ``‖∂r_i(x_n)/∂θ‖²`` (summed over the point's output components) for every term and point.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch) -> Mapping[str, Tensor]``.
        batch: What ``residuals`` takes; tensors in nested tuples, lists and dicts are split by point.
        chunk_size: Points per ``vmap`` chunk; bounds memory at about ``chunk × rows-per-point × P``
            floats. Default: as many as fit in 8 MiB on CPU (cache-friendly, fastest there) and 1 GiB
            on GPU.
        terms: Term order; default: ``module.terms`` if present, else the order ``residuals`` returns.
        reference: The full-batch residuals if the caller already has them (with their graph).
        indices: Optional subset of points per group, ``{N: LongTensor of point ids}`` where ``N`` is
            the point count shared by the group's terms; groups not named use all their points.

    Returns:
        A :class:`PointNorms`. Nothing is written to ``param.grad`` and the module's mode is unchanged.
        Modules whose trainable parameters all sit in :class:`~lightning_ntk.taylor.TaylorMLP` take
        the ``"structured"`` path (per-layer Gram identities, about one training step of cost) when
        it reproduces the general path on a few points.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    if terms is None:
        terms = getattr(module, "terms", None)
    if reference is None:
        check_batch_device(module, batch)
        if torch.is_inference_mode_enabled():
            evaluate_residuals(module, batch, terms)  # raises the clear inference-mode error
        structured = _structured_norms(module, batch, terms, chunk_size)
        if structured is not None:
            if indices is None:
                return structured
            picked = {}
            for name, values in structured.norms.items():
                index = indices.get(values.shape[0])
                picked[name] = values if index is None else values[index.to(values.device)]
            return PointNorms(picked, structured.num_rows, structured.paths)
    return _generic_norms(module, batch, chunk_size=chunk_size, terms=terms, reference=reference, indices=indices)


def _generic_norms(
    module: nn.Module,
    batch: object,
    *,
    chunk_size: int | None,
    terms: Sequence[str] | None,
    reference: Mapping[str, Tensor] | None,
    indices: Mapping[int, Tensor] | None,
) -> PointNorms:
    params = trainable_parameters(module)
    if reference is None:
        reference = evaluate_residuals(module, batch, terms)
    else:
        reference = check_residuals(reference, terms)
    names = list(reference)
    num_rows = {name: reference[name].numel() for name in names}
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(reference[name].shape[0], []).append(name)
    num_params = sum(p.numel() for p in params.values())
    first = next(iter(params.values()))
    itemsize, device = first.element_size(), first.device

    norms: dict[str, Tensor] = {}
    paths: dict[str, str] = {}
    for size, group in groups.items():
        split = _PointSplit(batch, size, set(groups) - {size})
        index = None if indices is None else indices.get(size)
        rows_per_point = max(num_rows[n] // size for n in group)
        chunk = chunk_size or _default_chunk_size(num_params, rows_per_point, itemsize, device)
        result, path, reason = None, "rows", "no tensor in the batch has one row per point"
        if split.splittable:
            attempts: list[tuple[str, Callable[..., dict[str, Tensor]]]] = [
                ("vmap", functools.partial(_vmap_norms, module, split, group, reference, params, chunk, index)),
                ("loop", functools.partial(_loop_norms, module, split, group, reference, params, index)),
            ]
            for path, attempt in attempts:
                for shrink in (True, False):
                    try:
                        result = attempt(shrink)
                        break
                    except _NotPointwise as err:
                        reason = str(err)
                    except Exception as err:
                        if path == "loop":
                            raise  # plain autograd failing is the user's bug: show it as it is
                        reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
                        break  # shrinking other terms' points does not make a residual vmappable
                if result is not None:
                    break
        if result is None:
            path = "rows"
            result = _rows_norms(reference, group, params, index)
        if path != "vmap":
            _warn_once(module, group, path, reason)
        for name in group:
            norms[name] = result[name]
            paths[name] = path
    return PointNorms(norms={n: norms[n] for n in names}, num_rows=num_rows, paths=paths)

"""Per-point squared norms ``‖∂r_i(x_n)/∂θ‖²`` for every term: the exact paths, tried fastest first.

``"gram"`` (:mod:`~lightning_ntk.jacobian.gram`)
    Gram identities over the parameter uses recorded in one residual evaluation: about one to two
    training steps for residuals in any style (autograd, :mod:`lightning_ntk.derivatives`,
    ``torch.func``, :class:`~lightning_ntk.taylor.TaylorMLP`). Checked once per module and batch
    layout against the next path on three points per term.
``"vmap"`` (:mod:`~lightning_ntk.jacobian.vmap`)
    ``torch.func.vmap`` over points of ``jacrev``: residuals that run under ``torch.func``.
``"loop"`` (:mod:`~lightning_ntk.jacobian.loop`)
    One evaluation and one ``torch.autograd.grad`` per point and row: any pointwise residual.
``"rows"`` (:mod:`~lightning_ntk.jacobian.rows`)
    One VJP per row through the whole batch: residuals whose rows mix points.

How the batch splits into points is inferred (:class:`~lightning_ntk.points.PointSplit`) and every
path's per-point values are checked against the full-batch residual, so a wrong inference costs
time, never a wrong trace.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ntk.contract import check_batch_device, check_residuals, evaluate_residuals, trainable_parameters
from lightning_ntk.jacobian.gram import GramLayouts, GramUnsupported, gram_squared_norms
from lightning_ntk.jacobian.loop import loop_norms
from lightning_ntk.jacobian.rows import rows_norms
from lightning_ntk.jacobian.vmap import NotPointwise, default_chunk_size, vmap_norms
from lightning_ntk.points import PointSplit, batch_signature, close, subsample_batch

__all__ = ["PATHS", "PathMemory", "PathUnavailable", "PointNorms", "per_point_squared_norms"]

PATHS = ("gram", "vmap", "loop", "rows")
# Points per recorded Gram pass: larger groups are cut into slices of this many points, which keeps
# the recorded activations of a 3x256 MLP with second derivatives near 1 GiB.
_GRAM_MAX_POINTS = 16384


class PathUnavailable(ValueError):
    """None of the exact paths the caller allowed applies to this module and batch."""


@dataclass(frozen=True)
class PointNorms:
    """Squared Jacobian norms per point for every term.

    Attributes:
        norms: term → tensor ``(N_i,)`` of ``Σ_rows-of-point ‖∂r/∂θ‖²``.
        num_rows: term → number of residual entries (rows of ``J_i``).
        paths: term → ``"gram"``, ``"vmap"``, ``"loop"`` or ``"rows"``.
    """

    norms: dict[str, Tensor]
    num_rows: dict[str, int]
    paths: dict[str, str]


class PathMemory:
    """What the exact paths learned about each module, per batch layout.

    Whether the Gram path holds (checked once against the per-point paths), the point layouts of its
    recorded uses, and which one-time messages were given. Entries die with their module.
    """

    def __init__(self) -> None:
        # module → {batch signature: True, or the reason the Gram path does not apply}
        self.gram_verdicts: weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool | str]] = weakref.WeakKeyDictionary()
        self.gram_layouts = GramLayouts()
        self.warned: set[tuple] = set()

    def clear(self) -> None:
        self.__init__()

    def warn_once(self, module: nn.Module, terms: list[str], path: str, reason: str) -> None:
        key = (type(module), tuple(terms), path)
        if key in self.warned:
            return
        self.warned.add(key)
        advice = ""
        if path in ("loop", "rows"):
            advice = (
                " For a faster path keep row n of each residual a function of point n only, and use parameters "
                "only in matrix products with points as rows and in elementwise ops (see the README)."
            )
        warnings.warn(
            f"Exact NTK traces of term(s) {terms} of {type(module).__name__} take the {path!r} path: {reason}."
            + advice,
            stacklevel=5,
        )


MEMORY = PathMemory()


def _check_paths(paths: Sequence[str] | None) -> tuple[str, ...]:
    if paths is None:
        return PATHS
    if isinstance(paths, str):
        paths = (paths,)
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"`paths` must name some of {list(PATHS)}, got {paths!r}.")
    return tuple(paths)


def per_point_squared_norms(
    module: nn.Module,
    batch: object,
    *,
    chunk_size: int | None = None,
    terms: Sequence[str] | None = None,
    reference: Mapping[str, Tensor] | None = None,
    indices: Mapping[int, Tensor] | None = None,
    paths: Sequence[str] | None = None,
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
        paths: The paths to try, in order (default: all, ``"gram"`` first). A single path that does
            not apply is an error instead of a fallback.

    Returns:
        A :class:`PointNorms`. Nothing is written to ``param.grad`` and the module's mode is unchanged.
    """
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    order = _check_paths(paths)
    if terms is None:
        terms = getattr(module, "terms", None)
    if reference is None:
        check_batch_device(module, batch)
        if torch.is_inference_mode_enabled():
            evaluate_residuals(module, batch, terms)  # raises the clear inference-mode error
    gram_reason = None
    if order[0] == "gram":
        result, gram_reason = _gram(module, batch, terms, chunk_size, reference, strict=len(order) == 1)
        if result is not None:
            return _pick(result, indices)
        order = order[1:]
    return _per_point_paths(module, batch, order, chunk_size, terms, reference, indices, gram_reason)


def _pick(result: PointNorms, indices: Mapping[int, Tensor] | None) -> PointNorms:
    if indices is None:
        return result
    picked = {}
    for name, values in result.norms.items():
        index = indices.get(values.shape[0])
        picked[name] = values if index is None else values[index.to(values.device)]
    return PointNorms(picked, result.num_rows, result.paths)


def _gram(
    module: nn.Module,
    batch: object,
    terms: Sequence[str] | None,
    chunk_size: int | None,
    reference: Mapping[str, Tensor] | None,
    strict: bool,
) -> tuple[PointNorms | None, str | None]:
    """The Gram path, or ``None`` and the reason it does not apply to this module and batch layout."""
    signature = batch_signature(batch)
    verdicts = MEMORY.gram_verdicts.setdefault(module, {})
    known = verdicts.get(signature)
    if isinstance(known, str):
        if strict:
            raise PathUnavailable(f"The 'gram' path does not apply: {known}.")
        return None, known
    params = trainable_parameters(module)

    def evaluate(b: object) -> dict[str, Tensor]:
        return evaluate_residuals(module, b, terms)

    try:
        norms, rows = _gram_in_slices(module, batch, params, evaluate, reference)
    except GramUnsupported as err:
        verdicts[signature] = f"the Gram path does not apply ({err})"
        if strict:
            raise PathUnavailable(f"The 'gram' path does not apply: {err}.") from err
        return None, verdicts[signature]
    names = list(norms)
    finite = all(bool(torch.isfinite(v).all()) for v in norms.values()) if signature not in verdicts else True
    if signature not in verdicts and finite:
        # The recorded uses cannot show everything (say, a residual normalized by a batch mean):
        # compare three points per term with the per-point paths once.
        sizes = {v.shape[0] for v in norms.values()}
        probe = {n: torch.unique(torch.tensor([0, n // 2, n - 1])) for n in sizes}
        check = _per_point_paths(module, batch, PATHS[1:], chunk_size, terms, reference, probe, None, quiet=True)
        for name, values in check.norms.items():
            want = norms[name][probe[norms[name].shape[0]].to(norms[name].device)]
            if not close(want, values):
                verdicts[signature] = (
                    f"the Gram path disagreed with the per-point {check.paths[name]!r} path on {name!r} (a parameter "
                    "use it does not see, e.g. inside a custom autograd.Function)"
                )
                if strict:
                    raise PathUnavailable(f"The 'gram' path does not apply: {verdicts[signature]}.")
                return None, verdicts[signature]
        verdicts[signature] = True
    return PointNorms(norms=norms, num_rows=rows, paths=dict.fromkeys(names, "gram")), None


def _gram_in_slices(
    module: nn.Module,
    batch: object,
    params: dict[str, Tensor],
    evaluate: Callable[[object], dict[str, Tensor]],
    reference: Mapping[str, Tensor] | None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    def run(b: object) -> tuple[dict[str, Tensor], dict[str, int]]:
        return gram_squared_norms(module, b, params, evaluate, MEMORY.gram_layouts, batch_signature(b))

    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor) and t.ndim > 0]
    if all(t.shape[0] <= _GRAM_MAX_POINTS for t in leaves):
        return run(batch)
    # Large groups: slice by slice, with every other group cut to one point.
    if reference is None:
        with torch.enable_grad():
            reference = evaluate(batch)
    sizes = {name: r.shape[0] for name, r in reference.items()}
    rows = {name: r.numel() for name, r in reference.items()}
    del reference
    one = torch.arange(1)
    norms: dict[str, list[Tensor]] = {name: [] for name in sizes}
    for size in sorted(set(sizes.values())):
        group = [name for name, s in sizes.items() if s == size]
        for start in range(0, size, _GRAM_MAX_POINTS):
            cut = {s: one for s in set(sizes.values()) if s != size}
            cut[size] = torch.arange(start, min(start + _GRAM_MAX_POINTS, size))
            part, _ = run(subsample_batch(batch, cut))
            for name in group:
                norms[name].append(part[name])
    return {name: torch.cat(v) for name, v in norms.items()}, rows


def _per_point_paths(
    module: nn.Module,
    batch: object,
    order: Sequence[str],
    chunk_size: int | None,
    terms: Sequence[str] | None,
    reference: Mapping[str, Tensor] | None,
    indices: Mapping[int, Tensor] | None,
    first_reason: str | None,
    quiet: bool = False,
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

    norms: dict[str, Tensor] = {}
    paths: dict[str, str] = {}
    for size, group in groups.items():
        split = PointSplit(batch, size, set(groups) - {size})
        index = None if indices is None else indices.get(size)
        rows_per_point = max(num_rows[n] // size for n in group)
        chunk = chunk_size or default_chunk_size(num_params, rows_per_point, first.element_size(), first.device)
        attempts: dict[str, Callable[[bool], dict[str, Tensor]]] = {
            "vmap": functools.partial(vmap_norms, module, split, group, reference, params, chunk, index),
            "loop": functools.partial(loop_norms, module, split, group, reference, params, index),
        }
        reasons = [first_reason] if first_reason else []
        if not split.splittable:
            reasons.append("no tensor in the batch has one row per point")
        tried = [p for p in order if p in attempts] if split.splittable else []
        result, path = _first_that_applies(attempts, tried, reasons)
        if result is None:
            if "rows" not in order:
                raise PathUnavailable(
                    f"No exact path in {list(order)} applies to term(s) {group}: {'; '.join(reasons)}."
                )
            result = rows_norms(reference, group, params, index)
        if not quiet and reasons:
            MEMORY.warn_once(module, group, path, "; ".join(reasons))
        for name in group:
            norms[name] = result[name]
            paths[name] = path
    return PointNorms(norms={n: norms[n] for n in names}, num_rows=num_rows, paths=paths)


def _first_that_applies(
    attempts: Mapping[str, Callable[[bool], dict[str, Tensor]]], tried: list[str], reasons: list[str]
) -> tuple[dict[str, Tensor] | None, str]:
    """The first per-point path in ``tried`` that works (``None, "rows"`` if none); why the others did not."""
    for path in tried:
        for shrink in (True, False):  # other groups' points cut to one row first, then left whole
            try:
                return attempts[path](shrink), path
            except NotPointwise as err:
                reason = f"{path}: {err}"
            except Exception as err:
                if path == "loop":
                    raise  # plain autograd failing is the user's bug: show it as it is
                reason = f"{path}: " + f"{type(err).__name__}: {err}".splitlines()[0][:160]
                break  # shrinking other terms' points does not make a residual vmappable
        reasons.append(reason)
    return None, "rows"

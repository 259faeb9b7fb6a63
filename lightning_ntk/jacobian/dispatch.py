"""The dispatcher: per-point squared norms ``‖∂r_i(x_n)/∂θ‖²`` for every term by the exact paths,
tried fastest first, each term on the first path that applies to it.

``"gram"`` (:mod:`~lightning_ntk.jacobian.gram`)
    Gram identities over the parameter uses recorded in one residual evaluation and one backward
    per output component (``benchmarks/exact_cost.py``: 0.8–1.1 training steps for scalar residuals,
    1.0 for a two-output 2-D PINN) for residuals in any style (autograd,
    :mod:`lightning_ntk.derivatives`, ``torch.func``, :class:`~lightning_ntk.taylor.TaylorMLP`).
    Cross-checked once per module and batch signature against a per-point path on up to three points per term
    (first, middle, last).
``"vmap"`` (:mod:`~lightning_ntk.jacobian.vmap`)
    ``torch.func.vmap`` over points of ``jacrev``: residuals that run under ``torch.func``.
``"loop"`` (:mod:`~lightning_ntk.jacobian.loop`)
    One evaluation and one ``torch.autograd.grad`` per point and row: any pointwise residual.
``"rows"`` (:mod:`~lightning_ntk.jacobian.rows`)
    One VJP per row through the whole batch: residuals whose rows mix points.

How the batch splits into points is inferred (:class:`~lightning_ntk.points.PointSplit`) and every
path's per-point values are checked against the full-batch residual, so a wrong inference costs
time, never a wrong trace. A residual that fails on a batch the package cut (a term that slices the
point tensor, say) makes that path step aside; ``rows`` evaluates only the batch it was given.

What is decided per module and batch signature is one :class:`~lightning_ntk.memory.ExactPathEntry`.
``docs/architecture.md`` follows a batch from the callback to the Gram products.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_ntk.contract import (
    check_batch,
    check_residuals,
    declared_terms,
    evaluate_residuals,
    trainable_parameters,
)
from lightning_ntk.jacobian.common import (
    GroupJob,
    PathUnavailable,
    PointNorms,
    Skipped,
    default_chunk_size,
    first_sentence,
)
from lightning_ntk.jacobian.gram import GramResult, GramUnsupported, gram_squared_norms
from lightning_ntk.jacobian.loop import loop_norms
from lightning_ntk.jacobian.rows import rows_norms
from lightning_ntk.jacobian.vmap import vmap_norms
from lightning_ntk.memory import ExactPathEntry, first_time, memory_of
from lightning_ntk.points import PointSplit, batch_signature, subsample_batch
from lightning_ntk.tolerances import close

__all__ = ["PATHS", "per_point_squared_norms"]

PATHS = ("gram", "vmap", "loop", "rows")
# Points per recorded Gram pass: larger groups are cut into slices of this many points, which keeps
# the recorded activations of a 3x256 MLP with second derivatives near 1 GiB.
_GRAM_MAX_POINTS = 16384


# What each slower path costs, for the one-time warning.
_PATH_COST = {
    "vmap": "vectorized per-point Jacobians, about P floats per point",
    "loop": "one residual evaluation and one backward pass per point",
    "rows": "one backward pass through the whole batch per residual row",
}


def _warn_once(module: nn.Module, taken: list[tuple[list[str], str, str]], others_on_gram: bool) -> None:
    """One two-line warning per module and outcome: which terms take which path, its cost, why, and
    what is cheaper. ``taken``: ``(terms, path, reason)`` per group of terms."""
    if not taken or not first_time((type(module), tuple((tuple(t), p) for t, p, _ in taken))):
        return
    by_path: dict[str, list[str]] = {}
    for terms, path, _ in taken:
        by_path.setdefault(path, []).extend(terms)
    parts = []
    for path, terms in by_path.items():
        cost = f" ({_PATH_COST[path]})" if path in _PATH_COST else ""
        parts.append(f"{terms} take{'s' if len(terms) == 1 else ''} the {path!r} path{cost}")
    reasons = "; ".join(dict.fromkeys(r.rstrip(".") for _, _, r in taken))
    stay = "The other terms stay on the Gram path. " if others_on_gram else ""
    warnings.warn(
        f"Exact NTK traces of {type(module).__name__}: {', '.join(parts)}, because {reasons}.\n"
        f"{stay}Cheaper for these terms: estimator=Subsample(num_points=...) or 'fd'; see "
        "'Bring your own PINN' in the docs for what keeps a term on the Gram path.",
        stacklevel=5,
    )


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
        terms = declared_terms(module)
    if reference is None:
        check_batch(module, batch)
        if torch.is_inference_mode_enabled():
            evaluate_residuals(module, batch, terms)  # raises the clear inference-mode error
    request = _Request(module, batch, terms, chunk_size, reference)
    if order[0] != "gram":
        result, taken = _per_point_norms(request, order, indices)
        _warn_once(module, [t for t in taken if t[2]], others_on_gram=False)
        return result
    gram = _gram_step(request)
    if gram.norms is not None and not gram.off_gram:
        return _pick(gram.norms, indices)
    if len(order) == 1:  # the caller allowed the Gram path alone
        why = gram.refused or "; ".join(f"{t}: {r}" for t, r in gram.off_gram.items())
        raise PathUnavailable(f"The 'gram' path does not apply: {why}.")
    only = None if gram.norms is None else set(gram.off_gram)
    rest, taken = _per_point_norms(request, order[1:], indices, only)
    # Why the Gram path does not apply is what the user can act on; the per-point paths' own
    # failures matter only when the Gram path was not asked for.
    taken = [(group, path, gram.refused or "; ".join(dict.fromkeys(gram.off_gram[t] for t in group)) or misses)
             for group, path, misses in taken]  # fmt: skip
    _warn_once(module, taken, others_on_gram=gram.norms is not None)
    if gram.norms is None:
        return rest
    gram_norms = _pick(gram.norms, indices)
    names = list(gram_norms.num_rows)  # every term, in order
    merged = {**gram_norms.norms, **rest.norms}
    paths = {**gram_norms.paths, **rest.paths}
    return PointNorms({n: merged[n] for n in names}, gram_norms.num_rows, {n: paths[n] for n in names})


@dataclass(frozen=True)
class _Request:
    """What every path is asked: the module, the batch and how to evaluate it."""

    module: nn.Module
    batch: object
    terms: Sequence[str] | None
    chunk_size: int | None
    reference: Mapping[str, Tensor] | None

    def evaluate(self, batch: object) -> dict[str, Tensor]:
        return evaluate_residuals(self.module, batch, self.terms)


def _pick(result: PointNorms, indices: Mapping[int, Tensor] | None) -> PointNorms:
    if indices is None:
        return result
    picked = {}
    for name, values in result.norms.items():
        index = indices.get(values.shape[0])
        picked[name] = values if index is None else values[index.to(values.device)]
    return PointNorms(picked, result.num_rows, result.paths)


# ------------------------------------------------------------------ the Gram step


@dataclass
class _GramStep:
    """The Gram path's norms for the terms it covers (``None``: none), the terms it does not cover
    with the reason, or one reason for all (``refused``)."""

    norms: PointNorms | None
    off_gram: dict[str, str] = field(default_factory=dict)
    refused: str | None = None


def _gram_step(request: _Request) -> _GramStep:
    """The Gram path on the whole batch, cross-checked the first time per module and batch signature."""
    entries = memory_of(request.module).exact
    signature = batch_signature(request.batch)
    entry = entries.setdefault(signature, ExactPathEntry())
    if entry.refused is not None:
        return _GramStep(None, refused=entry.refused)
    params = trainable_parameters(request.module)
    try:
        result = _gram_in_slices(request, params, frozenset(entry.off_gram))
    except GramUnsupported as err:
        entry.refused = f"the Gram path does not apply: {err}"
        return _GramStep(None, refused=entry.refused)
    except Exception as err:  # an error the recording causes (a tensor subclass, say) must not escape
        message = first_sentence(f"{type(err).__name__}: {err}")
        entry.refused = f"the residual failed under the Gram recording: {message}"
        return _GramStep(None, refused=entry.refused)
    off_gram = dict(entry.off_gram)
    off_gram.update({t: f"the Gram path does not apply: {why}" for t, why in result.unsupported.items()})
    norms = {t: v for t, v in result.norms.items() if t not in off_gram}
    # Only the first call per batch signature reads values on the host: a warm call never waits for the device.
    if not entry.checked and all(bool(torch.isfinite(v).all()) for v in norms.values()):
        off_gram.update(_cross_check(request, norms))
        entry.off_gram, entry.checked = dict(off_gram), True
        norms = {t: v for t, v in norms.items() if t not in off_gram}
    return _GramStep(PointNorms(norms, result.num_rows, dict.fromkeys(norms, "gram")), off_gram)


def _cross_check(request: _Request, norms: Mapping[str, Tensor]) -> dict[str, str]:
    """The terms whose Gram norms disagree with a per-point path on up to three points each, with the reason.

    The recorded uses cannot show everything (say, a parameter used inside a custom
    ``autograd.Function``): this runs once per module and batch signature.
    """
    if not norms:
        return {}
    sizes = {v.shape[0] for v in norms.values()}
    probe = {n: torch.unique(torch.tensor([0, n // 2, n - 1])) for n in sizes}
    check, _ = _per_point_norms(request, PATHS[1:], probe, only=set(norms))
    failed = {}
    for name, values in check.norms.items():
        want = norms[name][probe[norms[name].shape[0]].to(norms[name].device)]
        if not close(want, values):
            failed[name] = (
                f"the Gram path disagreed with the per-point {check.paths[name]!r} path (a parameter use it does "
                "not see, e.g. inside a custom autograd.Function)"
            )
    return failed


def _gram_in_slices(request: _Request, params: dict[str, Tensor], skip: frozenset[str]) -> GramResult:
    """The Gram path on the batch, or on slices of at most ``_GRAM_MAX_POINTS`` points of each large
    group (every other group cut to one point); a residual that fails on such a cut batch is taken whole."""
    entries = memory_of(request.module).exact

    def run(b: object) -> GramResult:
        entry = entries.setdefault(batch_signature(b), ExactPathEntry())
        result = gram_squared_norms(b, params, request.evaluate, entry.gram, skip)
        entry.gram = result.gram
        return result

    batch = request.batch
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor) and t.ndim > 0]
    if all(t.shape[0] <= _GRAM_MAX_POINTS for t in leaves):
        return run(batch)
    reference = request.reference
    if reference is None:
        with torch.enable_grad():
            reference = request.evaluate(batch)
    sizes = {name: r.shape[0] for name, r in reference.items()}
    rows = {name: r.numel() for name, r in reference.items()}
    del reference
    one = torch.arange(1)
    norms: dict[str, list[Tensor]] = {name: [] for name in sizes}
    unsupported: dict[str, str] = {}
    try:
        for size in sorted(set(sizes.values())):
            group = [name for name, s in sizes.items() if s == size]
            for start in range(0, size, _GRAM_MAX_POINTS):
                cut = {s: one for s in set(sizes.values()) if s != size}
                cut[size] = torch.arange(start, min(start + _GRAM_MAX_POINTS, size))
                part = run(subsample_batch(batch, cut))
                unsupported.update({n: r for n, r in part.unsupported.items() if n in group})
                for name in group:
                    if name in part.norms:
                        norms[name].append(part.norms[name])
    except GramUnsupported:
        raise
    except Exception:  # the residual does not survive the cut (a term slices the point tensor): whole
        return run(batch)
    whole = {name: torch.cat(v) for name, v in norms.items() if name not in unsupported and name not in skip}
    if any(v.shape[0] != sizes[name] for name, v in whole.items()):
        return run(batch)  # the cut changed how many rows a term has: its points are not the batch's rows
    return GramResult(whole, rows, unsupported)


# ------------------------------------------------------------------ the per-point paths


@dataclass(frozen=True)
class _PointPath:
    """A per-point path: ``compute(request, job)`` gives the norms of one point group (a :class:`GroupJob`)
    or :class:`~lightning_ntk.jacobian.common.Skipped`."""

    name: str
    compute: Callable[[_Request, GroupJob], dict[str, Tensor] | Skipped]


def _vmap(request: _Request, job: GroupJob) -> dict[str, Tensor] | Skipped:
    return vmap_norms(request.module, job)


def _loop(request: _Request, job: GroupJob) -> dict[str, Tensor] | Skipped:
    return loop_norms(request.module, job)


def _rows(request: _Request, job: GroupJob) -> dict[str, Tensor] | Skipped:
    return rows_norms(job)


# In the order they are tried; ``rows`` needs no split of the batch and always applies.
_POINT_PATHS = {p.name: p for p in (_PointPath("vmap", _vmap), _PointPath("loop", _loop), _PointPath("rows", _rows))}


def _per_point_norms(
    request: _Request,
    order: Sequence[str],
    indices: Mapping[int, Tensor] | None,
    only: Collection[str] | None = None,
) -> tuple[PointNorms, list[tuple[list[str], str, str]]]:
    """Norms of the terms in ``only`` (default: all) by the first per-point path in ``order`` that
    applies, group by group; and ``(terms, path, why the paths before it did not apply)`` per group
    (``""``: the first applied)."""
    params = trainable_parameters(request.module)
    if request.reference is None:
        reference = request.evaluate(request.batch)
    else:
        reference = check_residuals(request.reference, request.terms)
    names = [name for name in reference if only is None or name in only]
    num_rows = {name: reference[name].numel() for name in names}
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(reference[name].shape[0], []).append(name)
    num_params = sum(p.numel() for p in params.values())
    first = next(iter(params.values()))
    norms: dict[str, Tensor] = {}
    paths: dict[str, str] = {}
    taken: list[tuple[list[str], str, str]] = []
    all_sizes = {r.shape[0] for r in reference.values()}
    for size, group in groups.items():
        split = PointSplit(request.batch, size, all_sizes - {size})
        index = None if indices is None else indices.get(size)
        rows_per_point = max(num_rows[n] // size for n in group)
        chunk = request.chunk_size or default_chunk_size(num_params, rows_per_point, first.element_size(), first.device)
        misses = [] if split.splittable else ["no tensor in the batch has one row per point"]
        result, path = None, None
        for name in order:
            if name != "rows" and not split.splittable:
                continue
            for shrink in (True, False):  # other groups' points cut to one row first, then left whole
                job = GroupJob(split, group, reference, params, chunk, index, shrink)
                result = _POINT_PATHS[name].compute(request, job)
                if not isinstance(result, Skipped) or not result.retry:
                    break
            if not isinstance(result, Skipped):
                path = name
                break
            misses.append(result.reason)
        if path is None:
            raise PathUnavailable(f"No exact path in {list(order)} applies to term(s) {group}: {'; '.join(misses)}.")
        taken.append((group, path, "; ".join(misses)))
        for name in group:
            norms[name] = result[name]
            paths[name] = path
    return PointNorms(norms={n: norms[n] for n in names}, num_rows=num_rows, paths=paths), taken

"""The dispatcher: per-point squared norms ``‖∂r_i(x_n)/∂θ‖²`` for every term by the exact paths,
tried fastest first, each term on the first path that applies to it.

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
from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_ntk.contract import check_batch, check_residuals, evaluate_residuals, trainable_parameters
from lightning_ntk.jacobian.common import PathUnavailable, PointNorms, Skipped, default_chunk_size, first_sentence
from lightning_ntk.jacobian.gram import GramResult, GramUnsupported, gram_squared_norms
from lightning_ntk.jacobian.loop import loop_norms
from lightning_ntk.jacobian.rows import rows_norms
from lightning_ntk.jacobian.vmap import vmap_norms
from lightning_ntk.memory import first_time, memory_of
from lightning_ntk.points import PointSplit, batch_signature, close, subsample_batch

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
        terms = getattr(module, "terms", None)
    if reference is None:
        check_batch(module, batch)
        if torch.is_inference_mode_enabled():
            evaluate_residuals(module, batch, terms)  # raises the clear inference-mode error
    gram: PointNorms | None = None
    reasons: dict[str, str] = {}
    if order[0] == "gram":
        gram, reasons = _gram(module, batch, terms, chunk_size, reference)
        order = order[1:]
        if gram is not None and not reasons:
            return _pick(gram, indices)
        if not order:  # the caller allowed the Gram path alone
            why = "; ".join(r if t == "*" else f"{t}: {r}" for t, r in reasons.items())
            raise PathUnavailable(f"The 'gram' path does not apply: {why}.")
    rest = _per_point_paths(
        module, batch, order, chunk_size, terms, reference, indices, reasons, only=None if gram is None else reasons
    )
    if gram is None:
        return rest
    gram = _pick(gram, indices)
    names = list(gram.num_rows)  # every term, in order
    merged = {**gram.norms, **rest.norms}
    paths = {**gram.paths, **rest.paths}
    return PointNorms({n: merged[n] for n in names}, gram.num_rows, {n: paths[n] for n in names})


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
) -> tuple[PointNorms | None, dict[str, str]]:
    """Gram-path norms of the terms it applies to (``None``: no term), and why it does not apply to
    the others (``{"*": reason}`` when it applies to no term)."""
    signature = batch_signature(batch)
    verdicts = memory_of(module).gram_verdicts
    known = verdicts.get(signature)
    if isinstance(known, str):
        return None, {"*": known}
    failed = dict(known or {})
    params = trainable_parameters(module)

    def evaluate(b: object) -> dict[str, Tensor]:
        return evaluate_residuals(module, b, terms)

    try:
        result = _gram_in_slices(module, batch, params, evaluate, reference, frozenset(failed))
    except GramUnsupported as err:
        verdicts[signature] = f"the Gram path does not apply: {err}"
        return None, {"*": verdicts[signature]}
    except Exception as err:  # an error the recording causes (a tensor subclass, say) must not escape
        message = first_sentence(f"{type(err).__name__}: {err}")
        verdicts[signature] = f"the residual failed under the Gram recording: {message}"
        return None, {"*": verdicts[signature]}
    failed.update({t: f"the Gram path does not apply: {why}" for t, why in result.unsupported.items()})
    norms = {t: v for t, v in result.norms.items() if t not in failed}
    # Only the first call per layout reads values on the host: a warm call never waits for the device.
    if known is None and all(bool(torch.isfinite(v).all()) for v in norms.values()):
        failed.update(_cross_check(module, batch, norms, chunk_size, terms, reference))
        verdicts[signature] = dict(failed)
    norms = {t: v for t, v in norms.items() if t not in failed}
    return PointNorms(norms=norms, num_rows=result.num_rows, paths=dict.fromkeys(norms, "gram")), failed


def _cross_check(
    module: nn.Module,
    batch: object,
    norms: Mapping[str, Tensor],
    chunk_size: int | None,
    terms: Sequence[str] | None,
    reference: Mapping[str, Tensor] | None,
) -> dict[str, str]:
    """The terms whose Gram norms disagree with a per-point path on three points, with the reason.

    The recorded uses cannot show everything (say, a parameter used inside a custom
    ``autograd.Function``): this runs once per module and batch layout.
    """
    if not norms:
        return {}
    sizes = {v.shape[0] for v in norms.values()}
    probe = {n: torch.unique(torch.tensor([0, n // 2, n - 1])) for n in sizes}
    check = _per_point_paths(
        module, batch, PATHS[1:], chunk_size, terms, reference, probe, {}, only=set(norms), quiet=True
    )
    failed = {}
    for name, values in check.norms.items():
        want = norms[name][probe[norms[name].shape[0]].to(norms[name].device)]
        if not close(want, values):
            failed[name] = (
                f"the Gram path disagreed with the per-point {check.paths[name]!r} path (a parameter use it does "
                "not see, e.g. inside a custom autograd.Function)"
            )
    return failed


def _gram_in_slices(
    module: nn.Module,
    batch: object,
    params: dict[str, Tensor],
    evaluate: Callable[[object], dict[str, Tensor]],
    reference: Mapping[str, Tensor] | None,
    skip: frozenset[str],
) -> GramResult:
    def run(b: object) -> GramResult:
        return gram_squared_norms(b, params, evaluate, memory_of(module).gram_layouts, batch_signature(b), skip)

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
    unsupported: dict[str, str] = {}
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
    whole = {name: torch.cat(v) for name, v in norms.items() if name not in unsupported and name not in skip}
    return GramResult(whole, rows, unsupported)


def _per_point_paths(
    module: nn.Module,
    batch: object,
    order: Sequence[str],
    chunk_size: int | None,
    terms: Sequence[str] | None,
    reference: Mapping[str, Tensor] | None,
    indices: Mapping[int, Tensor] | None,
    reasons: Mapping[str, str],
    only: Collection[str] | None = None,
    quiet: bool = False,
) -> PointNorms:
    """Norms of the terms in ``only`` (default: all) by the first per-point path in ``order`` that applies.

    ``reasons``: why the Gram path does not apply, per term (``"*"``: to every term), for the warning.
    """
    params = trainable_parameters(module)
    if reference is None:
        reference = evaluate_residuals(module, batch, terms)
    else:
        reference = check_residuals(reference, terms)
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
        split = PointSplit(batch, size, all_sizes - {size})
        index = None if indices is None else indices.get(size)
        rows_per_point = max(num_rows[n] // size for n in group)
        chunk = chunk_size or default_chunk_size(num_params, rows_per_point, first.element_size(), first.device)
        attempts: dict[str, Callable[[bool], dict[str, Tensor]]] = {
            "vmap": functools.partial(vmap_norms, module, split, group, reference, params, chunk, index),
            "loop": functools.partial(loop_norms, module, split, group, reference, params, index),
        }
        why = list(dict.fromkeys(r for t in group if (r := reasons.get(t, reasons.get("*")))))
        if not split.splittable:
            why.append("no tensor in the batch has one row per point")
        tried = [p for p in order if p in attempts] if split.splittable else []
        result, path, misses = _first_that_applies(attempts, tried)
        if result is None:
            if "rows" not in order:
                raise PathUnavailable(
                    f"No exact path in {list(order)} applies to term(s) {group}: {'; '.join(why + misses)}."
                )
            result, path = rows_norms(reference, group, params, index), "rows"
        if why or misses:
            # Why the Gram path does not apply is what the user can act on; the per-point paths'
            # own failures matter only when the Gram path was not asked for.
            taken.append((group, path, "; ".join(why or misses)))
        for name in group:
            norms[name] = result[name]
            paths[name] = path
    if not quiet:
        _warn_once(module, taken, others_on_gram=only is not None and "*" not in reasons)
    return PointNorms(norms={n: norms[n] for n in names}, num_rows=num_rows, paths=paths)


def _first_that_applies(
    attempts: Mapping[str, Callable[[bool], dict[str, Tensor] | Skipped]], tried: list[str]
) -> tuple[dict[str, Tensor] | None, str | None, list[str]]:
    """The result and name of the first per-point path in ``tried`` that applies (``None, None`` if
    none does), and why the paths before it do not."""
    misses = []
    for path in tried:
        for shrink in (True, False):  # other groups' points cut to one row first, then left whole
            result = attempts[path](shrink)
            if not isinstance(result, Skipped):
                return result, path, misses
            if not result.retry:
                break
        misses.append(result.reason)
    return None, None, misses

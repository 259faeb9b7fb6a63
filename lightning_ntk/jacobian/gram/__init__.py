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

One call, in three steps, each in its own module:

1. :mod:`~.recording` — evaluate the residuals once under a ``TorchDispatchMode`` that records every
   use of a trainable parameter (:func:`~.recording.record_uses`). A warm call instead evaluates them
   plainly and finds the uses in the autograd graph (:mod:`~.walking`), where the confirming call
   showed that this finds every use with the same operand.
2. :mod:`~.layouts` — where the points sit in each use's output, confirmed once per module and batch
   signature by a seeded second backward (:func:`~.confirming.confirm_uses`, which also groups the terms
   and finds the cuts) and kept as one :class:`~.layouts.GramEntry`.
3. :mod:`~.accumulation` — each use's gradient as factors of its parameter's per-point gradient, and
   :mod:`~.accumulator` — the Gram products on them, per parameter, for all uses and output components.

Between 1 and 3 run the backward passes: on a warm call one per output component for every group of
terms whose uses are disjoint (each term evaluating the network on its own points: one group), so a
scalar PINN with any number of terms pays one backward, a two-field one two. A component's backward
skips the branches of the graph that only other components reach (:mod:`~.cuts`: rows assembled by
``torch.stack``), so two components cost about one backward of both, not two.

Invariants (each checked where it is named):

1. Row ``n`` of a term depends on point ``n`` only, or the whole batch is the term's one point.
   Confirmed per use by the seeded backward (:func:`~.layouts.choose_layout`), and per term once per
   module and batch signature by the dispatcher's cross-check against a per-point path on three points
   (:mod:`lightning_ntk.jacobian.dispatch`); a term that fails either takes a per-point path alone,
   the others stay here.
2. Every parameter use is recorded: the recorder follows each tensor aliasing a parameter by an index
   map (views, copies, scalings) and raises :class:`GramUnsupported` — for every term, since the
   recording is shared — on a use it cannot model. Uses it cannot see (inside a custom
   ``autograd.Function``) are caught by the cross-check of invariant 1.
3. Index maps live on the CPU and are read only while a layout is confirmed; what a warm call needs
   of them (:class:`~.layouts.UsePlan`) is kept on the device. A warm call reads nothing on the host.
4. A :class:`~.layouts.GramEntry` is kept per module and batch signature together with the
   fingerprint of the uses (parameter, kind, output shape, operand geometry); another fingerprint
   confirms everything again.
5. Terms share a backward only if no recorded use has a gradient from two of them, so the summed
   backward gives each use exactly its own term's gradient.
6. Only a batch whose residuals are all finite confirms layouts; a non-finite point poisons its own
   rows, so its norm is NaN and every other point's and term's is unaffected.
7. Norms accumulate in the parameters' dtype (factors recorded under autocast are promoted).
8. An output of a product with a parameter that is modified in place invalidates the recording.
9. Nothing is written to ``param.grad``; results carry no graph.
10. A component's backward is cut only at a ``stack``/``cat`` branch that it did not reach on the
    confirming batch and another component did (:mod:`~.cuts`); a nonzero gradient arriving at a cut
    on a warm call makes the norms of the terms in that backward NaN.
11. A walk stands in for the recorder only where every number applied to a parameter is one the
    graph saves (a Python scalar, not a tensor's value or an ``exp``), and only for a graph with the
    confirmed node names in the confirmed order, each parameter's accumulator in its place and every
    saved number unchanged; anything else records again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ntk.jacobian.gram import cuts, walking
from lightning_ntk.jacobian.gram.accumulation import term_jacobian, term_norms
from lightning_ntk.jacobian.gram.confirming import UseOutputs, confirm_uses
from lightning_ntk.jacobian.gram.cuts import Grads
from lightning_ntk.jacobian.gram.graph import locate
from lightning_ntk.jacobian.gram.layouts import GramEntry, UsePlan
from lightning_ntk.jacobian.gram.recording import GramUnsupported, Use, evaluate_plainly, fingerprint, record_uses

__all__ = ["GramEntry", "GramResult", "GramUnsupported", "gram_jacobian", "gram_squared_norms"]


@dataclass
class GramResult:
    """What one Gram pass gives: norms of the terms it covers, and why it does not cover the others.

    Attributes:
        norms: term → per-point ``‖∂r_i(x_n)/∂θ‖²`` (summed over a point's rows), parameters' dtype.
        num_rows: term → residual entries, for every term.
        unsupported: term → the reason the identities do not cover it (rows that mix points, say).
        gram: What this call confirmed or reused, to keep for the next call with this batch
            layout (``None``: nothing to keep, as after a batch with non-finite residuals).
        backwards: Backward passes this call ran.
        residuals: With ``per_term`` given, the residuals this call evaluated, one row per point
            (``(N, rows)``; their graph was freed by the last backward); ``None`` for the norms.
    """

    norms: dict[str, Tensor]
    num_rows: dict[str, int]
    unsupported: dict[str, str]
    gram: GramEntry | None = None
    backwards: int = 0
    residuals: dict[str, Tensor] | None = None


@torch.enable_grad()  # the sums over points must join the graph even when the caller runs under no_grad
def gram_squared_norms(
    batch: object,
    params: Mapping[str, Tensor],
    residuals_fn: Callable[[object], Mapping[str, Tensor]],
    known: GramEntry | None = None,
    skip: frozenset[str] = frozenset(),
    per_term: Callable[..., Tensor] | None = None,
) -> GramResult:
    """Per-point ``‖∂r_i(x_n)/∂θ‖²`` (summed over a point's rows) and row counts, term by term.

    A term whose rows the identities do not cover (its rows mix points) is reported in
    ``unsupported`` and the other terms are still computed. Non-finite residual rows give non-finite
    norms at those points only; layouts chosen on such a batch are not kept.

    Args:
        batch: What ``residuals_fn`` takes.
        params: The trainable parameters by name.
        residuals_fn: Evaluates and checks the residuals.
        known: What an earlier call on a batch of this layout confirmed (:attr:`GramResult.gram`).
        skip: Terms not to compute (known to need another path).
        per_term: What to make of a term's factors: :func:`~.accumulation.term_norms` (the norms, the default), or
            :func:`~.accumulation.term_jacobian` (the Jacobian rows themselves, see :func:`gram_jacobian`).

    Raises:
        GramUnsupported: The residual uses a parameter in a way the identities do not cover, for
            every term (the recording is shared).
    """
    found = _found_again(batch, params, residuals_fn, known)
    residuals, flat, uses, entry, located = found.residuals, found.flat, found.uses, found.entry, found.located
    rows = {term: r.numel() for term, r in residuals.items()}
    outputs = UseOutputs(uses)
    if entry is None:
        entry, grads, backwards = confirm_uses(uses, flat, outputs, params, skip)
        # Rows that are not finite confirm nothing about the layout there: such an entry is not kept.
        keep = entry if all(bool(torch.isfinite(r).all()) for r in residuals.values()) else None
        if keep is not None:
            keep.walk = walking.plan_walk(uses, list(flat.values()), params)
        batches: Iterable[_GroupGrads] = [_GroupGrads(grads, {}, backwards)]
    else:
        batches = _grads_by_group(entry, uses, flat, outputs, skip, located)
        keep = entry
    norms: dict[str, Tensor] = {}
    unsupported = dict(entry.unsupported)
    backwards = 0
    # term_norms is looked up per call, not bound at definition: the benchmarks time it by replacing it.
    reduce_terms = _TermReduction(entry, uses, outputs, params, flat, term_norms if per_term is None else per_term)
    for group in batches:
        backwards += group.backwards
        done, refused = reduce_terms(group)
        norms.update(done)
        unsupported.update(refused)
        # Dropped before the next group's backward runs: a warm call holds one group's gradients at a
        # time, so its memory stays near a training step's (the allocator does not hand pages back to
        # the system after each call only to fault them in again on the next, 10-15 % of a call).
        del group
    # The rows only for a caller that asked for other values than the norms (the exact traces need none of
    # them, and a detach per term is two to four more dispatched ops on every warm call).
    return GramResult(norms, rows, unsupported, keep, backwards, None if per_term is None else dict(flat))


def gram_jacobian(
    batch: object,
    params: Mapping[str, Tensor],
    residuals_fn: Callable[[object], Mapping[str, Tensor]],
    known: GramEntry | None = None,
    skip: frozenset[str] = frozenset(),
) -> GramResult:
    """:func:`gram_squared_norms` with the Jacobian rows instead of their norms: ``norms[term]`` is
    ``(N, C, P)``, ``∂r_n[c]/∂θ`` over ``params`` in their order (``C`` values per point). The same
    recording, layouts and backwards; the factors are summed per point instead of squared."""
    return gram_squared_norms(batch, params, residuals_fn, known, skip, per_term=term_jacobian)


@dataclass(frozen=True)
class _TermReduction:
    """What one call reduces every group's terms with: the confirmed entry, this evaluation's uses and
    outputs, the parameters, the residual rows, and ``reduce`` (:func:`~.accumulation.term_norms` or
    :func:`~.accumulation.term_jacobian`)."""

    entry: GramEntry
    uses: list[Use]
    outputs: UseOutputs
    params: Mapping[str, Tensor]
    flat: Mapping[str, Tensor]
    reduce: Callable[..., Tensor]

    def __call__(self, group: _GroupGrads) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The group's terms reduced, and the terms it could not reduce with the reason."""
        done: dict[str, Tensor] = {}
        refused: dict[str, str] = {}
        for term, per_component in group.grads.items():
            confirmed: dict[int, dict[int, tuple[Tensor, UsePlan]]] = {}
            try:
                for c, g in enumerate(per_component):
                    confirmed[c] = {}
                    for i, plan in self.entry.planned(term, c):
                        j = self.outputs.slot.get(i)
                        if j is None:
                            continue
                        if g[j] is None:
                            raise GramUnsupported("the parameter uses changed since the layout was confirmed")
                        confirmed[c][i] = (g[j], plan)
                done[term] = self.reduce(
                    self.uses, confirmed, self.params, self.flat[term].shape[0], self.entry.workspace
                )
            except GramUnsupported as err:
                refused[term] = str(err)
                continue
            if term in group.broken:  # a gradient reached a cut: these values miss part of it (invariant 10)
                done[term] = done[term].masked_fill(group.broken[term], float("nan"))
        return done, refused


@dataclass
class _GroupGrads:
    """The gradients of one group's backwards: term → per component; term → whether a nonzero gradient
    arrived at a cut (a device bool); the backwards run."""

    grads: dict[str, list[Grads]]
    broken: dict[str, Tensor]
    backwards: int


@dataclass(frozen=True)
class FoundUses:
    """One evaluation's residuals and parameter uses, and whether a confirmed entry holds for them.

    Attributes:
        residuals: The residuals as evaluated.
        flat: The same, one row per point (``(N, rows)``).
        uses: The parameter uses of this evaluation (recorded or walked).
        entry: The confirmed :class:`GramEntry` if it holds for this evaluation, else ``None`` (confirm again).
        located: The entry's cut nodes in this evaluation's graph (``None`` with no entry).
    """

    residuals: Mapping[str, Tensor]
    flat: dict[str, Tensor]
    uses: list[Use]
    entry: GramEntry | None
    located: dict | None


def _found_again(
    batch: object,
    params: Mapping[str, Tensor],
    residuals_fn: Callable[[object], Mapping[str, Tensor]],
    known: GramEntry | None,
) -> FoundUses:
    """The residuals and the uses of this evaluation, with ``known`` and its cut nodes if they hold for it.

    A warm call walks the graph of a plain evaluation where the entry has a walk plan; otherwise, or
    if the walk does not find the planned graph, the recorder runs."""
    if known is not None and known.walk is not None:
        residuals = evaluate_plainly(residuals_fn, batch)
        flat = _flat(residuals)
        uses = walking.walk_uses(known.walk, list(flat.values()), params)
        located = None if uses is None else _locate_cuts(known, list(flat.values()))
        if located is not None:
            return FoundUses(residuals, flat, uses, known, located)
        known.walk = None  # this module's graph changes between calls: the recorder from now on
        del residuals, flat, uses
    residuals, uses = record_uses(params, residuals_fn, batch)
    flat = _flat(residuals)
    if known is None or known.fingerprint != fingerprint(uses):
        return FoundUses(residuals, flat, uses, None, None)
    located = _locate_cuts(known, list(flat.values()))
    return FoundUses(residuals, flat, uses, None if located is None else known, located)


def _flat(residuals: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {term: r.reshape(r.shape[0], -1) for term, r in residuals.items()}


def _locate_cuts(entry: GramEntry, roots: list[Tensor]) -> dict[tuple[int, int], list] | None:
    """The entry's cut nodes in this call's graph, or ``None`` if the graph is not the confirmed one."""
    located = {}
    for key, found in entry.cuts.items():
        nodes = locate(found, roots)
        if nodes is None:
            return None
        located[key] = nodes
    return located


def _grads_by_group(
    entry: GramEntry,
    uses: list[Use],
    flat: Mapping[str, Tensor],
    outputs: UseOutputs,
    skip: frozenset[str],
    located: Mapping[tuple[int, int], list],
) -> Iterator[_GroupGrads]:
    """Each group's gradients per term and component, one group at a time: one backward per component,
    of the sum of the group's rows of component ``c`` (invariant 5 keeps them apart), cut where the entry
    says; and, for the terms of a backward with cuts, whether a nonzero gradient arrived at one."""
    groups = [(k, [t for t in group if t not in skip]) for k, group in enumerate(entry.groups)]
    groups = [(k, terms) for k, terms in groups if terms]
    last = sum(max(flat[t].shape[1] for t in terms) for _, terms in groups)
    backwards = 0
    for k, terms in groups:
        grads: dict[str, list[Grads]] = {}
        arriving: list[Tensor] = []
        for c in range(max(flat[t].shape[1] for t in terms)):
            total = sum(flat[t][:, c].sum() for t in terms if c < flat[t].shape[1])
            # The last backward of the call frees the graph as it goes (nothing runs through it again):
            # faster, and the accumulation then reuses memory that is still in cache.
            g = cuts.backward(total, outputs.tensors, located.get((k, c), ()), arriving, retain=backwards + 1 < last)
            backwards += 1
            planned = {i for t in terms for i, _ in entry.planned(t, c)}
            if any(g[j] is not None for i, j in outputs.slot.items() if i not in planned):
                # A use reached now that reached none of these terms when the layouts were confirmed.
                g = (None,) * len(g)
            for t in terms:
                if c < flat[t].shape[1]:
                    grads.setdefault(t, []).append(g)
            del g
        broken = dict.fromkeys(terms, torch.stack(arriving).any()) if arriving else {}
        yield _GroupGrads(grads, broken, max(flat[t].shape[1] for t in terms))

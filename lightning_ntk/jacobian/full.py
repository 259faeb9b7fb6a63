"""The whole residual Jacobian ``J = ∂r/∂θ``, one row per residual entry: what a Gauss–Newton step needs.

Terms on the Gram path (:mod:`~lightning_ntk.jacobian.gram`) get their rows from the same recorded
factors as their exact traces, summed per point instead of squared: one residual evaluation and one
backward per output component for all of them. Which terms the Gram path covers is decided once per
module and batch signature by the exact-trace dispatcher (:func:`~lightning_ntk.jacobian.per_point_squared_norms`,
with its cross-check against a per-point path), so a term whose traces would leave the Gram path
leaves it here too and takes one backward per row through the graph of the whole batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ntk.contract import declared_terms, evaluate_residuals, trainable_parameters
from lightning_ntk.jacobian.dispatch import per_point_squared_norms
from lightning_ntk.jacobian.gram import gram_jacobian
from lightning_ntk.memory import ExactPathEntry, first_time, memory_of
from lightning_ntk.points import batch_signature

__all__ = ["ResidualJacobian", "residual_jacobian"]


@dataclass(frozen=True)
class ResidualJacobian:
    """The residuals and their Jacobian on one batch, term by term, without autograd graphs.

    Attributes:
        residuals: term → the residual flattened, ``(R_i,)`` (``R_i`` entries, point-major).
        jacobians: term → ``∂r_i/∂θ``, ``(R_i, P)``, columns over :attr:`params` in their order.
        params: The trainable parameters by name: the columns of every Jacobian.
        paths: term → ``"gram"`` or ``"rows"`` (one backward per row).
    """

    residuals: dict[str, Tensor]
    jacobians: dict[str, Tensor]
    params: dict[str, Tensor]
    paths: dict[str, str]


def residual_jacobian(module: nn.Module, batch: object, terms: Sequence[str] | None = None) -> ResidualJacobian:
    """``J_i = ∂r_i/∂θ`` of every term over all trainable parameters, with the residuals it linearizes.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch)``.
        batch: What ``residuals`` takes.
        terms: Term order; default: ``module.terms`` if present, else the order ``residuals`` returns.

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(1, 1, bias=False)
        ...     def residuals(self, x):
        ...         return {"fit": self.lin(x).squeeze(-1)}
        >>> with torch.no_grad():
        ...     _ = Fit().lin.weight.fill_(2.0)
        >>> jac = residual_jacobian(Fit(), torch.tensor([[1.0], [3.0]]))
        >>> jac.jacobians["fit"]  # ∂(w x_n)/∂w = x_n
        tensor([[1.],
                [3.]])
    """
    if terms is None:
        terms = declared_terms(module)
    params = trainable_parameters(module)
    entry = _decided_paths(module, batch, terms)

    def evaluate(b: object) -> dict[str, Tensor]:
        return evaluate_residuals(module, b, terms)

    residuals: dict[str, Tensor] = {}
    jacobians: dict[str, Tensor] = {}
    if entry.refused is None:
        result = gram_jacobian(batch, params, evaluate, entry.gram, frozenset(entry.off_gram))
        if result.gram is not None:
            entry.gram = result.gram
        residuals = {t: r.detach().reshape(-1) for t, r in result.residuals.items()}
        skipped = set(entry.off_gram) | set(result.unsupported)
        jacobians = {t: rows.reshape(-1, rows.shape[-1]) for t, rows in result.norms.items() if t not in skipped}
    paths = dict.fromkeys(jacobians, "gram")
    names = list(terms) if terms is not None else list(residuals)
    if not names or any(t not in jacobians for t in names):
        evaluated = evaluate(batch)
        names = names or list(evaluated)
        rest = [t for t in names if t not in jacobians]
        _warn_rows(module, rest, entry.refused or "; ".join(entry.off_gram.get(t, "") for t in rest))
        for term in rest:
            jacobians[term] = _rows_by_backward(evaluated[term].reshape(-1), list(params.values()))
            residuals[term], paths[term] = evaluated[term].detach().reshape(-1), "rows"
    return ResidualJacobian(
        {t: residuals[t] for t in names}, {t: jacobians[t] for t in names}, dict(params), {t: paths[t] for t in names}
    )


def _decided_paths(module: nn.Module, batch: object, terms: Sequence[str] | None) -> ExactPathEntry:
    """What the exact-trace dispatcher decided for this module and batch signature (which terms the Gram path
    covers, cross-checked once against a per-point path), asking it first if it has not decided yet."""
    memory = memory_of(module).exact
    signature = batch_signature(batch)
    entry = memory.get(signature)
    if entry is None or (entry.refused is None and not entry.checked):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rows say which path each term took, and warn on their own
            per_point_squared_norms(module, batch, terms=terms)
        entry = memory[signature]
    return entry


def _rows_by_backward(flat: Tensor, params: list[Tensor]) -> Tensor:
    """``(R, P)``: one backward per entry of ``flat`` through its graph (any residual)."""
    rows = []
    for k in range(flat.shape[0]):
        grads = torch.autograd.grad(flat[k], params, retain_graph=True, allow_unused=True)
        full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        rows.append(torch.cat([g.reshape(-1) for g in full]))
    return torch.stack(rows) if rows else flat.new_zeros(0, sum(p.numel() for p in params))


def _warn_rows(module: nn.Module, terms: list[str], why: str) -> None:
    if first_time(("residual_jacobian", type(module), tuple(terms))):
        warnings.warn(
            f"The Jacobian rows of {terms} of {type(module).__name__} take one backward pass per residual entry "
            f"(slow), because {why.rstrip('.') or 'the Gram path does not cover them'}. See 'Bring your own PINN' "
            "in the docs for what keeps a term on the Gram path.",
            stacklevel=3,
        )

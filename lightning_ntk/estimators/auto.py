"""Pick the exact estimator or a sketch from the cost of exact traces.

Where the Gram path applies (:mod:`lightning_ntk.jacobian.gram`: MLP-like networks, any residual
style) exact traces cost one to two training steps whatever ``N_i``, and ``"auto"`` is exact.
Otherwise the exact estimator materializes one ``P``-vector per residual row: its work grows as
``W = Σ_i N_i · P`` (rows × trainable parameters). Measured on CPU (torch 2.13, 3×256 tanh MLP,
u_xx residual): ``W ≈ 1.1e9`` (N = 4096 per term) took ~30 training steps, ``W ≈ 1.7e7`` (a 2×50
MLP, 100 points) a fraction of one. Below ``max_exact_work`` (default ``2.5e8``, a few seconds on a
laptop CPU and well under a second on a GPU) ``"auto"`` is then exact; above, it uses Hutch++, whose
cost is a fixed number of backward passes (``num_probes``) whatever ``N_i``, and which is accurate
to well under 1 % on the nearly low-rank blocks of PINNs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_ntk.contract import declared_terms, evaluate_residuals, trainable_parameters
from lightning_ntk.estimators.base import (
    TraceEstimate,
    TraceEstimator,
    check_positive_int,
    check_positive_number,
    register_estimator,
)
from lightning_ntk.estimators.exact import exact_traces
from lightning_ntk.estimators.hutchpp import hutchpp_traces
from lightning_ntk.jacobian import PathUnavailable

__all__ = ["DEFAULT_MAX_EXACT_WORK", "Auto", "auto_traces", "exact_work"]

DEFAULT_MAX_EXACT_WORK = 2.5e8


def exact_work(module: nn.Module, residuals: Mapping[str, Tensor]) -> float:
    """``Σ_i N_i · P``: residual rows times trainable parameters."""
    rows = sum(r.numel() for r in residuals.values())
    return float(rows * sum(p.numel() for p in trainable_parameters(module).values()))


def auto_traces(
    module: nn.Module,
    batch: object,
    *,
    max_exact_work: float = DEFAULT_MAX_EXACT_WORK,
    num_probes: int = 9,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> TraceEstimate:
    """Exact traces by the Gram path, else exact when ``Σ_i N_i · P ≤ max_exact_work``, else Hutch++.

    The choice is recorded in ``info["chosen"]``.
    """
    try:
        est = exact_traces(module, batch, chunk_size=chunk_size, paths=("gram",))
        rows = sum(est.num_rows.values())
        work = float(rows * sum(p.numel() for p in trainable_parameters(module).values()))
    except PathUnavailable:
        residuals = evaluate_residuals(module, batch, declared_terms(module))
        work = exact_work(module, residuals)
        if work <= max_exact_work:
            # The evaluation above doubles as the exact path's reference: no second forward.
            est = exact_traces(module, batch, chunk_size=chunk_size, reference=residuals)
        else:
            est = hutchpp_traces(module, batch, num_probes=num_probes, generator=generator)
    return TraceEstimate(
        est.traces, est.stderr, est.num_rows, "auto", {**est.info, "chosen": est.estimator, "work": work}
    )


@register_estimator("auto")
class Auto(TraceEstimator):
    """Exact traces where they are cheap, Hutch++ otherwise (:func:`auto_traces`).

    Example:
        >>> Auto(num_probes=12)
        Auto(max_exact_work=250000000.0, num_probes=12, chunk_size=None)
    """

    function = staticmethod(auto_traces)

    def __init__(
        self, max_exact_work: float = DEFAULT_MAX_EXACT_WORK, num_probes: int = 9, chunk_size: int | None = None
    ) -> None:
        check_positive_number(max_exact_work, "max_exact_work")
        check_positive_int(num_probes, "num_probes")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        super().__init__(max_exact_work=max_exact_work, num_probes=num_probes, chunk_size=chunk_size)

"""The residuals contract shared by the pure-torch core and the Lightning layer.

A module that takes part in NTK weighting declares named loss terms and implements
``residuals(batch) -> Mapping[str, Tensor]``: for every term, the per-point predictor output whose
Jacobian with respect to the trainable parameters is that term's block of the NTK. Row ``n`` of a
term's tensor (``shape[0]``) belongs to collocation point ``n``; every entry is one row of ``J_i``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = [
    "ResidualCaller",
    "check_batch",
    "check_residuals",
    "check_term_mapping",
    "check_term_weights",
    "check_terms",
    "evaluate_residuals",
    "explain_input_derivatives",
    "fresh_tensors",
    "nonfinite_rows",
    "trainable_parameters",
]


def declared_terms(module: object) -> Sequence[str] | None:
    """The module's declared term names (``module.terms``), or ``None``: whatever ``residuals`` returns."""
    return getattr(module, "terms", None)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad=True``, tied ones once. Frozen parameters are not part of θ."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters; the NTK is empty.")
    return params


class ResidualCaller(nn.Module):
    """``forward(batch) = inner.residuals(batch)``, for ``torch.func.functional_call``.

    ``functional_call`` swaps parameters and calls ``forward()``; ``residuals()`` is the function the
    NTK needs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, batch: object) -> Mapping[str, Tensor]:
        return self.inner.residuals(batch)


def check_terms(terms: Sequence[str]) -> tuple[str, ...]:
    """Validate declared term names: a non-empty sequence of distinct, non-empty strings.

    Example:
        >>> check_terms(["bc", "pde"])
        ('bc', 'pde')
    """
    if isinstance(terms, str) or not isinstance(terms, Sequence):
        raise TypeError(f"`terms` must be a sequence of term names such as ['bc', 'pde'], got {terms!r}.")
    names = tuple(terms)
    if not names:
        raise ValueError("`terms` is empty: declare at least one loss term, e.g. terms=['bc', 'pde'].")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Every term name must be a non-empty string, got {name!r} in {list(names)}.")
        if "/" in name:
            raise ValueError(f"Term name {name!r} contains '/', which would split its TensorBoard tag.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"`terms` declares {duplicates} more than once; term names must be distinct.")
    return names


# A vector-valued residual with as many components as points is a broadcast, not a system of PDEs, once the
# points are this many (below it, a two-point, two-component term is legitimate).
SQUARE_RESIDUAL_MIN = 8


def check_residuals(
    residuals: object, terms: Sequence[str] | None = None, *, require_grad: bool = True
) -> dict[str, Tensor]:
    """Check what ``residuals(batch)`` returned against the declared terms.

    Args:
        residuals: The value returned by ``module.residuals(batch)``.
        terms: The declared term names; ``None`` accepts whatever names are returned.
        require_grad: Also demand that every residual depends on a trainable parameter (true whenever
            autograd is recording, i.e. outside ``torch.no_grad`` / ``torch.inference_mode``).

    Returns:
        The residuals as a ``dict`` in declaration order.

    Raises:
        TypeError: If the value is not a mapping or an entry is not a floating-point tensor.
        ValueError: If names differ from the declared terms, or a residual is empty, has no point
            dimension, or does not depend on any trainable parameter.
    """
    if not isinstance(residuals, Mapping):
        raise TypeError(
            f"`residuals(batch)` must return a mapping from term name to tensor, got {type(residuals).__name__}."
        )
    if terms is not None:
        extra = [name for name in residuals if name not in terms]
        if extra:
            raise ValueError(
                f"`residuals(batch)` returned term(s) {extra} that were not declared; declared terms: {list(terms)}."
            )
        missing = [name for name in terms if name not in residuals]
        if missing:
            raise ValueError(f"`residuals(batch)` did not return declared term(s) {missing}.")
        order: Sequence[str] = terms
    else:
        order = list(residuals)
    out: dict[str, Tensor] = {}
    for name in order:
        value = residuals[name]
        if not isinstance(value, Tensor):
            raise TypeError(f"Residual of term {name!r} must be a torch.Tensor, got {type(value).__name__}.")
        if not value.is_floating_point():
            raise TypeError(f"Residual of term {name!r} has dtype {value.dtype}; residuals must be floating point.")
        if value.ndim == 0:
            raise ValueError(
                f"Residual of term {name!r} is a scalar; return one entry per point, shape (N,) or (N, d)."
            )
        if value.numel() == 0:
            raise ValueError(f"Residual of term {name!r} is empty (shape {tuple(value.shape)}).")
        if value.ndim == 2 and value.shape[0] == value.shape[1] >= SQUARE_RESIDUAL_MIN:
            n = value.shape[0]
            raise ValueError(
                f"Residual of term {name!r} has shape ({n}, {n}): as many columns as points, the mark of "
                f"broadcasting an ({n}, 1) tensor against an ({n},) one (e.g. `u_x` of shape ({n}, 1) plus `v_y` "
                f"of shape ({n},)), which mixes every point with every other. Give both the same shape "
                "(`.squeeze(-1)` the (N, 1) one, or `.unsqueeze(-1)` the other) before combining them."
            )
        if require_grad and not value.requires_grad:
            raise ValueError(
                f"Residual of term {name!r} does not depend on any trainable parameter, so its NTK block is "
                "zero and it cannot be weighted. Build it from the network's output (and make sure the "
                "parameters it uses have requires_grad=True)."
            )
        out[name] = value
    return out


def check_batch(module: torch.nn.Module, batch: object) -> None:
    """Raise a clear error if the batch cannot meet the module's parameters: another device, or
    another floating dtype that the residual does not convert itself.

    A dtype mismatch alone is allowed (a residual may cast its inputs); it is an error only if the
    residual then fails, and the error names both dtypes instead of a matmul 30 frames deep.
    """
    param = next(iter(module.parameters()), None)
    if param is None:
        return
    mismatched = []
    for i, leaf in enumerate(tree_flatten(batch)[0]):
        if not (isinstance(leaf, Tensor) and leaf.is_floating_point()):
            continue
        if leaf.device != param.device:
            raise ValueError(
                f"Tensor {i} of the batch (shape {tuple(leaf.shape)}) is on {leaf.device}, but the module's "
                f"parameters are on {param.device}. Move the batch first, e.g. "
                f"lightning.pytorch.utilities.move_data_to_device(batch, {str(param.device)!r})."
            )
        if leaf.dtype != param.dtype:
            mismatched.append((i, leaf))
    if not mismatched:
        return
    try:
        with torch.enable_grad():
            module.residuals(batch)
    except RuntimeError as err:
        i, leaf = mismatched[0]
        raise TypeError(
            f"Tensor {i} of the batch (shape {tuple(leaf.shape)}) is {leaf.dtype}, but the module's parameters "
            f"are {param.dtype}, and the residual fails on it ({str(err).splitlines()[0]}). Give both the same "
            f"dtype: convert the batch (e.g. in the DataModule) or the model (model.to({leaf.dtype}))."
        ) from err


_NO_GRAD_INPUT = "One of the differentiated Tensors does not require grad"


def input_derivative_error(owner: str, err: RuntimeError) -> RuntimeError | None:
    """For torch's bare error about a derivative with respect to points without ``requires_grad``, one that
    says what to change (``owner``: the class whose ``residuals`` raised it); ``None`` for any other error."""
    if _NO_GRAD_INPUT not in str(err):
        return None
    return RuntimeError(
        f"{owner}.residuals(batch) takes a derivative with respect to points that do not require grad. Make the "
        "points a leaf that does before the network sees them, e.g. `x = batch['pde'].clone().requires_grad_(True)`, "
        "or take the input derivatives with lightning_ntk.derivatives (`partial(net, x, 0, 0)`), which needs no "
        "requires_grad."
    )


def evaluate_residuals(module: torch.nn.Module, batch: object, terms: Sequence[str] | None = None) -> dict:
    """Call ``module.residuals(batch)`` with autograd recording and check the result.

    Grad mode is forced on because residuals in the ordinary PINN style take input derivatives with
    ``torch.autograd.grad``, which needs a graph even when the caller runs under ``torch.no_grad``.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "NTK traces need autograd, but torch.inference_mode is active; compute them outside inference "
            "mode (e.g. not from validation_step with Trainer(inference_mode=True))."
        )
    residuals_fn = getattr(module, "residuals", None)
    if not callable(residuals_fn):
        raise TypeError(f"{type(module).__name__} has no `residuals(batch)` method; see lightning_ntk.PINNModule.")
    check_batch(module, batch)
    with torch.enable_grad():
        try:
            residuals = residuals_fn(batch)
        except RuntimeError as err:
            explained = input_derivative_error(type(module).__name__, err)
            if explained is None:
                raise
            raise explained from err
        return check_residuals(residuals, terms, require_grad=True)


def nonfinite_rows(residuals: Mapping[str, Tensor]) -> dict[str, str]:
    """For every term with NaN or infinite entries: where the first is, as words for an error message.

    Example:
        >>> r = {"bc": torch.zeros(3), "pde": torch.tensor([[0.0], [float("nan")], [float("inf")]])}
        >>> nonfinite_rows(r)
        {'pde': 'nan at row 1, one of 2 non-finite rows (3 rows in all)'}
    """
    out = {}
    for name, r in residuals.items():
        flat = r.detach().reshape(r.shape[0], -1)
        bad_rows = (~torch.isfinite(flat)).any(1).nonzero().flatten()
        if bad_rows.numel():
            row = int(bad_rows[0])
            value = flat[row][~torch.isfinite(flat[row])][0].item()
            which = "the only non-finite row" if bad_rows.numel() == 1 else f"one of {bad_rows.numel()} non-finite rows"
            out[name] = f"{value} at row {row}, {which} ({flat.shape[0]} rows in all)"
    return out


def check_term_mapping(value: object, terms: Sequence[str], what: str, entry: str) -> Mapping:
    """``value`` if it is a mapping ``{term: entry}`` whose keys are all declared ``terms``; else an error that
    names ``what`` was given and the declared terms."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping {{term: {entry}}}, got {type(value).__name__}.")
    unknown = [name for name in value if name not in terms]
    if unknown:
        raise ValueError(f"Unknown term(s) {unknown} in {what}; declared terms: {list(terms)}.")
    return value


def check_term_weights(weights: object, terms: Sequence[str]) -> dict[str, float]:
    """``{term: weight}`` for some of ``terms``, each a finite number > 0, as floats; else an error that says
    which term and what it must be."""
    weights = check_term_mapping(weights, terms, "weights", "weight")
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"Weight of term {name!r} must be a finite number > 0, got {value!r}.")
    return {name: float(value) for name, value in weights.items()}


def fresh_tensors(batch: object) -> object:
    """``batch`` with every tensor leaf cloned: tensors made under inference mode cannot enter an autograd graph,
    their clones made outside it can."""
    leaves, spec = tree_flatten(batch)
    return tree_unflatten([t.clone() if isinstance(t, Tensor) else t for t in leaves], spec)


def explain_input_derivatives(residuals: Callable[..., Any]) -> Callable[..., Any]:
    """``residuals`` with torch's bare error about differentiating w.r.t. points without ``requires_grad``
    replaced by one that says what to change (:func:`input_derivative_error`)."""

    @functools.wraps(residuals)
    def wrapped(self: object, batch: object) -> Any:
        try:
            return residuals(self, batch)
        except RuntimeError as err:
            explained = input_derivative_error(type(self).__name__, err)
            if explained is None:
                raise
            raise explained from err

    return wrapped

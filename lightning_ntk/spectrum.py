"""NTK matrices and spectra: the full empirical NTK for small N, top-k eigenvalues for any N.

``K = J Jᵀ`` with ``J = [J_1; …; J_T]`` the residual Jacobians of all terms stacked by rows; its
diagonal blocks ``K_ii`` are what the weights use, its off-diagonal blocks ``K_ij`` couple the terms
(Wang, Yu & Perdikaris 2022). Small problems form ``K`` and use ``torch.linalg.eigvalsh``; large ones
run Lanczos on NTK-vector products ``K v = J (Jᵀ v)`` (one VJP and one double-backward JVP per product)
without ever forming ``K`` or ``J``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ntk.products import JacobianProducts

__all__ = ["DEFAULT_MAX_NTK_BYTES", "Spectrum", "block_spectra", "lanczos_top_k", "ntk_eigenvalues", "ntk_matrix"]

DEFAULT_MAX_NTK_BYTES = 1 << 30
_EXACT_MAX_ROWS = 2048


def _flatten(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _check_size(rows: int, params: int, itemsize: int, max_bytes: int) -> None:
    need = (rows * params + rows * rows) * itemsize
    if need > max_bytes:
        raise MemoryError(
            f"Forming the NTK of {rows} rows over {params} parameters needs about {need / 2**20:.0f} MiB "
            f"(J and K), over the limit of {max_bytes / 2**20:.0f} MiB. Use fewer points, raise `max_bytes`, "
            "or use ntk_eigenvalues(..., method='lanczos'), which never forms K."
        )


def ntk_matrix(
    module: nn.Module,
    batch: object,
    *,
    max_bytes: int = DEFAULT_MAX_NTK_BYTES,
    terms: list[str] | None = None,
) -> tuple[Tensor, dict[str, slice]]:
    """The full empirical NTK ``K = J Jᵀ`` over all terms, and each term's rows and columns.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch)``.
        batch: The batch ``residuals`` takes.
        max_bytes: Refuse (with the size needed) when ``J`` and ``K`` would take more memory.
        terms: Only these terms' rows (default: all), e.g. ``["pde"]`` for ``K_rr`` alone.

    Returns:
        ``(K, index)``: ``K`` of shape ``(R, R)`` with ``R = Σ_i N_i`` residual entries, and
        ``index[term]`` a ``slice`` so that ``K[index["bc"], index["pde"]]`` is ``K_bc,pde``.

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(1, 1, bias=False)
        ...     def residuals(self, x):
        ...         return {"a": self.lin(x[:1]), "b": self.lin(x[1:])}
        >>> K, index = ntk_matrix(Fit(), torch.tensor([[1.0], [2.0], [3.0]]))
        >>> K    # x xᵀ
        tensor([[1., 2., 3.],
                [2., 4., 6.],
                [3., 6., 9.]])
        >>> index
        {'a': slice(0, 1, None), 'b': slice(1, 3, None)}
    """
    products = JacobianProducts(module, batch)
    chosen = list(products.residuals) if terms is None else list(terms)
    unknown = [t for t in chosen if t not in products.residuals]
    if unknown:
        raise ValueError(f"Unknown term(s) {unknown}; terms: {list(products.residuals)}.")
    return _ntk_matrix_of(products, chosen, max_bytes)


def _ntk_matrix_of(products: JacobianProducts, chosen: list[str], max_bytes: int) -> tuple[Tensor, dict[str, slice]]:
    """:func:`ntk_matrix` from residuals already evaluated (one evaluation serves every block)."""
    rows = sum(products.num_rows(t) for t in chosen)
    num_params = sum(p.numel() for p in products.params)
    first = next(iter(products.residuals.values()))
    _check_size(rows, num_params, first.element_size(), max_bytes)
    blocks, index, start = [], {}, 0
    for name in chosen:
        r = products.residuals[name]
        n = r.numel()
        eye = torch.eye(n, dtype=r.dtype, device=r.device)
        blocks.append(torch.stack([_flatten(products.vjp(name, eye[i])).detach() for i in range(n)]))
        index[name] = slice(start, start + n)
        start += n
    jac = torch.cat(blocks)
    gram = jac @ jac.T
    # A matmul rounds K_nm and K_mn differently; users take blocks and eigvalsh expects symmetry.
    return (gram + gram.T) / 2, index


def lanczos_top_k(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    *,
    num_iter: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Top-``k`` eigenvalues (descending) of a symmetric operator from ``num_iter`` Lanczos steps.

    Full reorthogonalization keeps the Krylov basis orthogonal in floating point; PINN NTK blocks
    have fast-decaying spectra, so the top Ritz values converge in a few dozen steps. Default
    ``num_iter = min(n, max(2k + 20, 40))``. When the Krylov space closes early (numerical rank
    below ``k``, eigenvalues under about ``100·eps·λ_1``), the missing eigenvalues are returned as 0.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5]))
        >>> [round(float(v), 4) for v in lanczos_top_k(lambda v: A @ v, 4, 2)]
        [5.0, 3.0]
    """
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be between 1 and the operator size {n}, got {k}.")
    m = min(n, num_iter or max(2 * k + 20, 40))
    where = torch.device(generator.device) if generator is not None else torch.device(device)
    q = torch.randn(n, generator=generator, device=where, dtype=dtype).to(device)
    q = q / torch.linalg.vector_norm(q)
    basis = torch.zeros(m, n, dtype=dtype, device=device)
    alphas, betas = [], []
    scale = 0.0
    for j in range(m):
        basis[j] = q
        w = matvec(q).detach()
        alpha = torch.dot(w, q)
        alphas.append(alpha)
        for _ in range(2):  # twice is enough (Parlett's "twice is enough")
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = torch.linalg.vector_norm(w)
        scale = max(scale, abs(float(alpha)) + float(beta))
        # An invariant subspace is found (NTK blocks are often of low numerical rank): the Ritz values
        # are exact, and normalizing the round-off left in w would only add spurious directions.
        if j == m - 1 or float(beta) <= 1e2 * torch.finfo(dtype).eps * scale:
            break
        betas.append(beta)
        q = w / beta
    t = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas[: len(alphas) - 1])
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t).flip(0)[:k]
    if ritz.numel() < k:
        # The Krylov space closed early: the rest of the spectrum is below the round-off of the
        # products (about eps·λ_1), i.e. zero at this precision.
        ritz = torch.cat([ritz, ritz.new_zeros(k - ritz.numel())])
    return ritz


@dataclass(frozen=True)
class Spectrum:
    """Top eigenvalues of an NTK block and what they say.

    Attributes:
        eigenvalues: The top ``k``, descending.
        trace: ``Tr K`` of the block (exact).
        condition_ratio: ``λ_max / λ_k``: how much slower the ``k``-th eigendirection trains.
        effective_rank: ``Tr K / λ_max``: how many directions carry the trace (1 = one dominates).
        top_k_fraction: ``Σ top-k / Tr K``: share of the trace held by the top ``k``.
        method: ``"exact"`` or ``"lanczos"``.
    """

    eigenvalues: Tensor
    trace: Tensor
    condition_ratio: Tensor
    effective_rank: Tensor
    top_k_fraction: Tensor
    method: str


def ntk_eigenvalues(
    module: nn.Module,
    batch: object,
    k: int = 10,
    term: str | None = None,
    method: str = "auto",
    *,
    num_iter: int | None = None,
    generator: torch.Generator | None = None,
    max_bytes: int = DEFAULT_MAX_NTK_BYTES,
    trace: Tensor | None = None,
) -> Spectrum:
    """Top-``k`` eigenvalues of the full NTK (``term=None``) or of one diagonal block ``K_ii``.

    Args:
        module: Any ``nn.Module`` with ``residuals(batch)``.
        batch: The batch ``residuals`` takes.
        k: How many eigenvalues.
        term: A term name for its block, or ``None`` for the whole ``K``.
        method: ``"exact"`` (form the block, ``eigvalsh``), ``"lanczos"`` (matrix-free), or
            ``"auto"``: exact up to 2,048 rows, Lanczos above.
        num_iter: Lanczos steps (see :func:`lanczos_top_k`).
        generator: Seeds the Lanczos start vector.
        max_bytes: Memory limit for the exact method.
        trace: ``Tr`` of the block (or of ``K``) if already known, e.g. from :func:`ntk_traces`; the
            Lanczos method otherwise computes it exactly, which can cost more than Lanczos itself.

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(1, 1, bias=False)
        ...     def residuals(self, x):
        ...         return {"a": self.lin(x)}
        >>> spec = ntk_eigenvalues(Fit(), torch.tensor([[1.0], [2.0]]), k=1)
        >>> spec.eigenvalues, spec.effective_rank   # K = x xᵀ has one eigenvalue, ‖x‖² = 5
        (tensor([5.]), tensor(1.))
    """
    _check_method(method)
    products = JacobianProducts(module, batch)
    names = list(products.residuals)
    if term is not None and term not in products.residuals:
        raise ValueError(f"Unknown term {term!r}; terms: {names}.")
    chosen = [term] if term is not None else names
    n = sum(products.num_rows(t) for t in chosen)
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be between 1 and the number of rows ({n}), got {k}.")
    top, method, block_trace = _top_eigenvalues(products, chosen, k, method, num_iter, generator, max_bytes)
    if trace is None:
        trace = block_trace if block_trace is not None else _exact_trace(module, batch, chosen)
    return _summarize(top, trace, method)


def block_spectra(
    module: nn.Module,
    batch: object,
    k: int = 5,
    method: str = "auto",
    *,
    num_iter: int | None = None,
    generator: torch.Generator | None = None,
    max_bytes: int = DEFAULT_MAX_NTK_BYTES,
) -> dict[str, Spectrum]:
    """:func:`ntk_eigenvalues` of every diagonal block ``K_ii``, from one residual evaluation.

    ``k`` is capped at each block's number of rows.

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(1, 1, bias=False)
        ...     def residuals(self, x):
        ...         return {"a": self.lin(x), "b": 2 * self.lin(x[:1])}
        >>> {t: s.eigenvalues for t, s in block_spectra(Fit(), torch.tensor([[1.0], [2.0]]), k=2).items()}
        {'a': tensor([5., 0.]), 'b': tensor([4.])}
    """
    _check_method(method)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    products = JacobianProducts(module, batch)
    spectra: dict[str, Spectrum] = {}
    traces: dict[str, Tensor] | None = None
    for name in products.residuals:
        k_i = min(k, products.num_rows(name))
        top, used, trace = _top_eigenvalues(products, [name], k_i, method, num_iter, generator, max_bytes)
        if trace is None:
            traces = traces or _exact_traces(module, batch)
            trace = traces[name]
        spectra[name] = _summarize(top, trace, used)
    return spectra


def _check_method(method: str) -> None:
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"Unknown method {method!r}; choose 'auto', 'exact' or 'lanczos'.")


def _exact_traces(module: nn.Module, batch: object) -> dict[str, Tensor]:
    from lightning_ntk.estimators.exact import exact_traces  # the exact trace of the same rows

    return exact_traces(module, batch).traces


def _exact_trace(module: nn.Module, batch: object, chosen: list[str]) -> Tensor:
    traces = _exact_traces(module, batch)
    return sum(traces[t] for t in chosen)


def _top_eigenvalues(
    products: JacobianProducts,
    chosen: list[str],
    k: int,
    method: str,
    num_iter: int | None,
    generator: torch.Generator | None,
    max_bytes: int,
) -> tuple[Tensor, str, Tensor | None]:
    """Top ``k`` eigenvalues of the NTK restricted to ``chosen`` terms, the method used, and the
    trace when it came for free (the exact method forms the matrix)."""
    sizes = [products.num_rows(t) for t in chosen]
    n = sum(sizes)
    if method == "auto":
        method = "exact" if n <= _EXACT_MAX_ROWS else "lanczos"
    if method == "exact":
        block, _ = _ntk_matrix_of(products, chosen, max_bytes)
        return torch.linalg.eigvalsh(block).flip(0)[:k], method, block.diagonal().sum()

    def matvec(v: Tensor) -> Tensor:
        parts = v.split(sizes)
        jtv = None
        for t, part in zip(chosen, parts, strict=True):
            g = products.vjp(t, part)
            jtv = g if jtv is None else [a + b for a, b in zip(jtv, g, strict=True)]
        return torch.cat([products.jvp(t, jtv) for t in chosen])

    first = products.residuals[chosen[0]]
    top = lanczos_top_k(matvec, n, k, num_iter=num_iter, dtype=first.dtype, device=first.device, generator=generator)
    return top, method, None


def _summarize(top: Tensor, trace: Tensor, method: str) -> Spectrum:
    top = top.clamp_min(0)  # K is PSD; rounding can make the smallest Ritz values slightly negative
    lam_max = top[0]
    tiny = torch.finfo(top.dtype).tiny
    return Spectrum(
        eigenvalues=top,
        trace=trace,
        condition_ratio=lam_max / top[-1].clamp_min(tiny),
        effective_rank=trace / lam_max.clamp_min(tiny),
        top_k_fraction=top.sum() / trace,
        method=method,
    )

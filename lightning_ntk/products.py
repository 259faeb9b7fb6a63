"""Jacobian–vector and NTK–vector products of the residuals through plain autograd.

One residual evaluation (with its graph) serves every product, and plain ``torch.autograd.grad``
works with residuals in any style, including ``torch.autograd.grad(..., create_graph=True)`` input
derivatives. Products never touch ``param.grad``.

- ``vjp(term, v) = J_iᵀ v`` (a list shaped like the parameters): one backward.
- ``jvp(term, u) = J_i u``: the transpose of the VJP, taken by differentiating ``J_iᵀ w`` (linear in
  a dummy ``w``) with respect to ``w``; one double backward, no forward-mode AD needed.
- ``ntk_matvec(term, v) = K_ii v = J_i (J_iᵀ v)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from lightning_ntk.contract import declared_terms, evaluate_residuals, trainable_parameters

__all__ = ["JacobianProducts"]


class JacobianProducts:
    """Products with the residual Jacobians ``J_i`` of a module on one batch.

    Example:
        >>> class Fit(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = nn.Linear(2, 1, bias=False)
        ...     def residuals(self, x):
        ...         return {"fit": self.lin(x).squeeze(-1)}
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> prods = JacobianProducts(Fit(), x)
        >>> prods.ntk_matvec("fit", torch.tensor([1.0, 0.0]))  # K = x xᵀ, first column
        tensor([1., 1.])
    """

    def __init__(self, module: nn.Module, batch: object, terms: Sequence[str] | None = None) -> None:
        if terms is None:
            terms = declared_terms(module)
        self.params = list(trainable_parameters(module).values())
        self.residuals = evaluate_residuals(module, batch, terms)
        self._linear_vjp: dict[str, tuple[Tensor, list[Tensor | None]]] = {}

    def num_rows(self, term: str) -> int:
        return self.residuals[term].numel()

    def vjp(self, term: str, v: Tensor) -> list[Tensor]:
        """``J_iᵀ v`` for ``v`` with one entry per residual entry; zeros for unused parameters."""
        r = self.residuals[term]
        grads = torch.autograd.grad(
            r, self.params, grad_outputs=v.reshape(r.shape).to(r), retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params, strict=True)]

    def jvp(self, term: str, u: Sequence[Tensor]) -> Tensor:
        """``J_i u`` for ``u`` shaped like the trainable parameters, flattened to one entry per row."""
        if term not in self._linear_vjp:
            r = self.residuals[term]
            w = torch.zeros_like(r, requires_grad=True)
            grads = torch.autograd.grad(r, self.params, grad_outputs=w, create_graph=True, allow_unused=True)
            self._linear_vjp[term] = (w, list(grads))
        w, grads = self._linear_vjp[term]
        pairs = [(g, ui) for g, ui in zip(grads, u, strict=True) if g is not None and g.requires_grad]
        if not pairs:
            return torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        (out,) = torch.autograd.grad(
            [g for g, _ in pairs], w, grad_outputs=[ui.to(g) for g, ui in pairs], retain_graph=True, allow_unused=True
        )
        return torch.zeros_like(w).reshape(-1) if out is None else out.reshape(-1)

    def ntk_matvec(self, term: str, v: Tensor) -> Tensor:
        """``K_ii v = J_i J_iᵀ v``, flattened."""
        return self.jvp(term, self.vjp(term, v))

    @staticmethod
    def squared_norm(vectors: Sequence[Tensor]) -> Tensor:
        return sum(t.square().sum() for t in vectors)

    def per_term(
        self, estimate: Callable[[str, Tensor], tuple[Tensor, Tensor]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
        """``estimate(term, residual) -> (trace, stderr)`` for every term: (traces, stderrs, row counts)."""
        traces, stderr, rows = {}, {}, {}
        for name, r in self.residuals.items():
            trace, error = estimate(name, r)
            traces[name], stderr[name], rows[name] = trace.detach(), error.detach(), r.numel()
        return traces, stderr, rows

"""An MLP that propagates Taylor streams explicitly, and exact NTK traces from per-layer Gram identities.

:class:`TaylorMLP` computes the network value and the input derivatives a residual needs (first
derivatives, pure and mixed second derivatives) by pushing *streams* through the layers: for a dense
layer every stream goes through the same ``W`` (the value stream also gets the bias), and the
activation mixes them by the chain rule,

    value:  h = σ(z)
    first:  h_i  = σ'(z) z_i
    second: h_ij = σ'(z) z_ij + σ''(z) z_i z_j .

Plain autograd differentiates all of it, so training works as usual. Because every use of ``W``
for point ``n`` is one stream, the per-point gradient of a residual row is ``Σ_s δ_{n,s} h_{n,s}ᵀ``
with ``δ_{n,s} = ∂r_n/∂z_{n,s}``, hence

    ‖∂r_n/∂W‖_F² = Σ_{s,s'} (δ_{n,s}·δ_{n,s'}) (h_{n,s}·h_{n,s'}),   ‖∂r_n/∂b‖² = ‖δ_{n,value}‖²,

and one backward of ``Σ_n r_n`` (per output component) gives every ``δ`` when row ``n`` depends
only on point ``n``. :func:`structured_squared_norms` does that: exact ``Tr K_ii`` at about the cost
of one training step, no per-point gradient ever formed. The exact estimator uses it automatically
when it applies and checks it once against the ``torch.func`` path (see :mod:`lightning_ntk.jacobian`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "TaylorMLP", "recording", "structured_squared_norms"]


def _tanh(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    t = torch.tanh(z)
    d1 = 1 - t * t
    return t, d1, -2 * t * d1


def _sin(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sin(z)
    return s, torch.cos(z), -s


def _softplus(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    return nn.functional.softplus(z), s, s * (1 - s)


def _silu(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    return z * s, s + z * s * (1 - s), s * (1 - s) * (2 + z * (1 - 2 * s))


def _gelu(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return z * cdf, cdf + z * pdf, pdf * (2 - z * z)


ACTIVATIONS = {"tanh": _tanh, "sin": _sin, "softplus": _softplus, "silu": _silu, "gelu": _gelu}

StreamKey = tuple[int, ...]


class _Recorder:
    """What one residual evaluation pushed through the MLPs: per call and layer, inputs and outputs."""

    def __init__(self) -> None:
        self.calls: list[tuple[TaylorMLP, list[tuple[Tensor, Tensor]]]] = []


_ACTIVE: list[_Recorder] = []


@contextmanager
def recording():
    """Record the streams of every :class:`TaylorMLP` call made inside the block."""
    rec = _Recorder()
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.remove(rec)


class TaylorMLP(nn.Module):
    """A dense network ``R^d_in → R^d_out`` with explicit Taylor streams for input derivatives.

    Args:
        d_in: Input dimension.
        width: Units per hidden layer.
        depth: Hidden layers.
        d_out: Output dimension (several fields).
        activation: ``"tanh"``, ``"sin"``, ``"softplus"``, ``"silu"`` or ``"gelu"``.
        fourier_features: If given, ``(m, σ)``: a fixed embedding ``[sin(2πBx), cos(2πBx)]`` with
            ``B ~ N(0, σ²)`` of shape ``(m, d_in)`` before the first dense layer.

    Example:
        >>> net = TaylorMLP(2, 16, 2)
        >>> xt = torch.rand(5, 2)
        >>> d = net.taylor(xt, first=[1], second=[0])      # u, u_t, u_xx
        >>> d["u"].shape, d[1].shape, d[0, 0].shape
        (torch.Size([5, 1]), torch.Size([5, 1]), torch.Size([5, 1]))
    """

    def __init__(
        self,
        d_in: int,
        width: int,
        depth: int,
        d_out: int = 1,
        activation: str = "tanh",
        fourier_features: tuple[int, float] | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        self.d_in, self.activation = d_in, activation
        first = d_in
        if fourier_features is not None:
            m, sigma = fourier_features
            self.register_buffer("fourier_B", torch.randn(m, d_in) * sigma)
            first = 2 * m
        else:
            self.fourier_B = None
        dims = [first] + [width] * depth + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        return self.taylor(x)["u"]

    def taylor(
        self,
        x: Tensor,
        first: Sequence[int] = (),
        second: Sequence[int] = (),
        mixed: Sequence[tuple[int, int]] = (),
    ) -> dict:
        """Value and derivatives at points ``x`` of shape ``(N, d_in)``.

        Returns a dict with ``"u"`` and, per request, key ``i`` for ``∂u/∂x_i``, ``(i, i)`` for
        ``∂²u/∂x_i²`` and ``(i, j)`` for ``∂²u/∂x_i∂x_j``; each ``(N, d_out)``.
        """
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"Points must have shape (N, {self.d_in}), got {tuple(x.shape)}.")
        pure = sorted(set(second))
        mix = sorted({(min(i, j), max(i, j)) for i, j in mixed if i != j})
        firsts = sorted(set(first) | set(pure) | {i for pair in mix for i in pair})
        for i in firsts:
            if not 0 <= i < self.d_in:
                raise ValueError(f"Derivative dimension {i} is out of range for d_in={self.d_in}.")
        seconds = [(i, i) for i in pure] + mix
        keys: list = ["u", *[(i,) for i in firsts], *seconds]
        n = x.shape[0]
        streams = [x]
        eye = torch.eye(self.d_in, dtype=x.dtype, device=x.device)
        streams += [eye[i].expand(n, -1) for i in firsts]
        streams += [x.new_zeros(n, self.d_in) for _ in seconds]
        h = torch.stack(streams)  # (S, N, d_in)
        index = {k: s for s, k in enumerate(keys)}
        if self.fourier_B is not None:
            h = self._fourier(h, keys, index)
        recorder = _ACTIVE[-1] if _ACTIVE else None
        record: list[tuple[Tensor, Tensor]] = []
        for layer_no, layer in enumerate(self.layers):
            z = torch.einsum("sni,oi->sno", h, layer.weight)
            z = torch.cat([z[:1] + layer.bias, z[1:]])
            if recorder is not None:
                record.append((h, z))
            if layer_no == len(self.layers) - 1:
                h = z
                break
            h = self._activate(z, keys, index)
        if recorder is not None:
            recorder.calls.append((self, record))
        out = {"u": h[0]}
        for k in keys[1:]:
            out[k[0] if len(k) == 1 else k] = h[index[k]]
        return out

    def _activate(self, z: Tensor, keys: list, index: dict) -> Tensor:
        s0, d1, d2 = ACTIVATIONS[self.activation](z[0])
        out = [s0]
        for k in keys[1:]:
            zk = z[index[k]]
            if len(k) == 1:
                out.append(d1 * zk)
            else:
                i, j = k
                out.append(d1 * zk + d2 * z[index[(i,)]] * z[index[(j,)]])
        return torch.stack(out)

    def _fourier(self, h: Tensor, keys: list, index: dict) -> Tensor:
        B = 2 * math.pi * self.fourier_B  # (m, d_in)
        p = h[0] @ B.T  # phase (N, m)
        s, c = torch.sin(p), torch.cos(p)
        out = [torch.cat([s, c], dim=-1)]
        for k in keys[1:]:
            if len(k) == 1:
                b = B[:, k[0]]
                out.append(torch.cat([c * b, -s * b], dim=-1))
            else:
                b = B[:, k[0]] * B[:, k[1]]
                out.append(torch.cat([-s * b, -c * b], dim=-1))
        return torch.stack(out)


def structured_squared_norms(
    module: nn.Module, batch: object, residuals_fn=None
) -> tuple[dict[str, Tensor], dict[str, int]] | None:
    """Per-point ``‖∂r_i(x_n)/∂θ‖²`` from Gram identities, or ``None`` when they do not apply.

    They apply when every trainable parameter belongs to a :class:`TaylorMLP`'s dense layers, and
    every call of an MLP that a term depends on has one row per point of that term (pointwise
    residual). The caller must still check pointwise-ness, which the streams alone cannot prove.
    """
    mlps = [m for m in module.modules() if isinstance(m, TaylorMLP)]
    if not mlps:
        return None
    covered = {id(p) for m in mlps for p in m.layers.parameters()}
    if any(p.requires_grad and id(p) not in covered for p in module.parameters()):
        return None
    with torch.enable_grad(), recording() as rec:
        out = (residuals_fn or module.residuals)(batch)
    zs = [z for _, record in rec.calls for _, z in record]
    if not zs:
        return None
    norms: dict[str, Tensor] = {}
    rows: dict[str, int] = {}
    for name, r in out.items():
        if r.ndim == 0 or not r.requires_grad:
            return None
        n = r.shape[0]
        flat = r.reshape(n, -1)
        total = flat.new_zeros(n)
        for c in range(flat.shape[1]):
            deltas = torch.autograd.grad(flat[:, c].sum(), zs, retain_graph=True, allow_unused=True)
            it = iter(deltas)
            per_layer: dict[tuple[int, int], list[tuple[Tensor, Tensor, int]]] = {}
            for mlp, record in rec.calls:
                for layer_no, (h, _) in enumerate(record):
                    delta = next(it)
                    if delta is None:
                        continue
                    if delta.shape[1] != n:
                        return None  # a call with another point count feeds this term
                    per_layer.setdefault((id(mlp), layer_no), []).append((h, delta, 1))
            for uses in per_layer.values():
                h = torch.cat([u[0] for u in uses])  # all streams of all calls: (S, N, in)
                d = torch.cat([u[1] for u in uses])  # (S, N, out)
                gram_h = torch.einsum("sni,tni->nst", h.detach(), h.detach())
                gram_d = torch.einsum("sno,tno->nst", d, d)
                value = torch.stack([u[1][0] for u in uses]).sum(0)  # bias enters the value streams
                total = total + (gram_h * gram_d).sum((1, 2)) + value.square().sum(-1)
        norms[name] = total.detach()
        rows[name] = r.numel()
    return norms, rows

"""An MLP that propagates Taylor streams explicitly: value and input derivatives in one pass.

:class:`TaylorMLP` computes the network value and the input derivatives a residual needs (first
derivatives, pure and mixed second derivatives) by pushing *streams* through the layers: for a dense
layer every stream goes through the same ``W`` (the value stream also gets the bias), and the
activation mixes them by the chain rule,

    value:  h = σ(z)
    first:  h_i  = σ'(z) z_i
    second: h_ij = σ'(z) z_ij + σ''(z) z_i z_j .

Plain autograd differentiates all of it, so training works as usual, and one pass gives ``u``,
``u_t``, ``u_tt`` and ``u_xx`` together: a training step costs about half that of the same network
with nested autograd or ``jvp`` derivatives. Its exact NTK traces come from the general Gram path
(:mod:`lightning_ntk.jacobian.gram`), like those of any MLP.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "TaylorMLP"]


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
        for layer_no, layer in enumerate(self.layers):
            z = torch.einsum("sni,oi->sno", h, layer.weight)
            z = torch.cat([z[:1] + layer.bias, z[1:]])
            if layer_no == len(self.layers) - 1:
                h = z
                break
            h = self._activate(z, keys, index)
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

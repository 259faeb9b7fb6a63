"""The networks stiff time-dependent PINNs need, written as ordinary PyTorch user code.

JAX-PI's recipe for Allen–Cahn and Burgers (Wang, Wang & Perdikaris 2023, "An expert's guide to
training physics-informed neural networks"), with nothing specific to lightning_ntk: every piece is a
plain ``nn.Module`` whose weights enter through ``F.linear`` or ``@``, so exact NTK traces take the
fast Gram path (``tests/test_examples_pde.py`` checks each network against a hand-built Jacobian).

- :class:`PeriodicEmbedding`: ``x ↦ (cos(2πx/P), sin(2πx/P))`` for the periodic columns, so the
  solution is periodic by construction (a hard constraint: no boundary term).
- :class:`FourierFeatures`: ``v ↦ (cos(vB), sin(vB))`` with a trainable ``B ~ N(0, σ²)`` (Tancik et al.
  2020), against the spectral bias of a plain MLP.
- :class:`RWFLinear`: random weight factorization ``W = diag(exp(s)) V`` (Wang, Wang & Perdikaris
  2022), trainable ``s`` and ``V``; starts at the same ``W`` as a Glorot-initialized layer.
- :class:`ModifiedMLP`: the modified MLP of Wang, Teng & Perdikaris (2021): two encoders ``U``, ``V``
  of the input, and every hidden layer ``H ← σ(layer(H)) ⊙ U + (1 − σ(layer(H))) ⊙ V``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PeriodicEmbedding(nn.Module):
    """Replace each periodic column ``x`` by ``cos(2πx/P), sin(2πx/P)``; other columns pass through.

    Args:
        inputs: Number of input columns.
        periods: ``{column: period}``.
    """

    def __init__(self, inputs: int, periods: dict[int, float]) -> None:
        super().__init__()
        self.inputs, self.periods = inputs, dict(periods)
        self.outputs = inputs + len(periods)

    def forward(self, x: Tensor) -> Tensor:
        columns = []
        for j in range(self.inputs):
            if j in self.periods:
                angle = 2 * math.pi / self.periods[j] * x[:, j : j + 1]
                columns += [torch.cos(angle), torch.sin(angle)]
            else:
                columns.append(x[:, j : j + 1])
        return torch.cat(columns, dim=1)


class FourierFeatures(nn.Module):
    """``(cos(vB), sin(vB))`` with a trainable ``B`` of shape ``(inputs, features // 2)``, ``B ~ N(0, σ²)``."""

    def __init__(self, inputs: int, features: int, scale: float) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(inputs, features // 2) * scale)
        self.outputs = 2 * (features // 2)

    def forward(self, x: Tensor) -> Tensor:
        z = x @ self.kernel
        return torch.cat([torch.cos(z), torch.sin(z)], dim=1)


class RWFLinear(nn.Module):
    """A linear layer with the weight ``diag(exp(s)) V``: ``s ~ N(mean, std²)`` per output, and
    ``V = W₀ / exp(s)`` for a Glorot-normal ``W₀``, so the layer starts where a plain one would."""

    def __init__(self, inputs: int, outputs: int, mean: float = 1.0, std: float = 0.1) -> None:
        super().__init__()
        w0 = torch.randn(outputs, inputs) * math.sqrt(2.0 / (inputs + outputs))
        s = mean + std * torch.randn(outputs)
        self.s = nn.Parameter(s)
        self.v = nn.Parameter(w0 / torch.exp(s)[:, None])
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, torch.exp(self.s)[:, None] * self.v, self.bias)


def dense(inputs: int, outputs: int, rwf: bool) -> nn.Module:
    """An RWF layer or a Glorot-normal ``nn.Linear`` with zero bias (JAX-PI's plain dense layer)."""
    if rwf:
        return RWFLinear(inputs, outputs)
    layer = nn.Linear(inputs, outputs)
    nn.init.xavier_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ModifiedMLP(nn.Module):
    """The modified MLP with tanh, optional periodic embedding, Fourier features and RWF layers.

    Args:
        inputs: Input columns (e.g. 2 for ``(x, t)``).
        width: Hidden width.
        depth: Number of hidden layers.
        outputs: Output fields.
        periods: ``{column: period}`` embedded periodically (e.g. ``{0: 2.0}`` for x on [−1, 1]).
        fourier: ``(features, σ)`` of the Fourier features, or ``None``.
        rwf: Random weight factorization in every layer.
        modified: ``False`` gives a plain tanh MLP with the same embeddings (for ablations).
    """

    def __init__(
        self,
        inputs: int,
        width: int,
        depth: int,
        outputs: int = 1,
        periods: dict[int, float] | None = None,
        fourier: tuple[int, float] | None = None,
        rwf: bool = True,
        modified: bool = True,
    ) -> None:
        super().__init__()
        embeddings: list[nn.Module] = []
        size = inputs
        if periods:
            embeddings.append(PeriodicEmbedding(size, periods))
            size = embeddings[-1].outputs
        if fourier is not None:
            embeddings.append(FourierFeatures(size, *fourier))
            size = embeddings[-1].outputs
        self.embed = nn.Sequential(*embeddings)
        self.modified = modified
        if modified:
            self.encode_u, self.encode_v = dense(size, width, rwf), dense(size, width, rwf)
        self.hidden = nn.ModuleList(dense(size if i == 0 else width, width, rwf) for i in range(depth))
        self.head = dense(width, outputs, rwf)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if self.modified:
            u, v = torch.tanh(self.encode_u(h)), torch.tanh(self.encode_v(h))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
            if self.modified:
                h = h * u + (1 - h) * v
        return self.head(h)


def network_from_options(
    inputs: int,
    width: int,
    depth: int,
    outputs: int,
    periods: dict[int, float] | None,
    features: Sequence[str],
    fourier_scale: float = 1.0,
) -> ModifiedMLP:
    """The network of an ablation run: ``features`` ⊂ {"fourier", "rwf", "modified"} switches parts on."""
    unknown = set(features) - {"fourier", "rwf", "modified"}
    if unknown:
        raise ValueError(f"Unknown network feature(s) {sorted(unknown)}; choose from fourier, rwf, modified.")
    return ModifiedMLP(
        inputs,
        width,
        depth,
        outputs,
        periods=periods,
        fourier=(width, fourier_scale) if "fourier" in features else None,
        rwf="rwf" in features,
        modified="modified" in features,
    )

"""Seeded random draws on the right device, shared by the randomized estimators."""

from __future__ import annotations

import torch
from torch import Tensor


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor), then move.
    return torch.device(generator.device) if generator is not None else device


def rademacher(
    shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """±1 entries with equal probability."""
    where = _draw_device(generator, device)
    bits = torch.randint(0, 2, shape, generator=generator, device=where)
    return (bits * 2 - 1).to(device=device, dtype=dtype)


def sample_points(size: int, count: int, *, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``count`` distinct point ids out of ``size`` (all of them, in order, when ``count >= size``)."""
    if count >= size:
        return torch.arange(size, device=device)
    where = _draw_device(generator, device)
    return torch.randperm(size, generator=generator, device=where)[:count].to(device)


def mean_and_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of i.i.d. samples and its standard error (NaN, i.e. unknown, for a single sample)."""
    mean = samples.mean()
    if samples.numel() < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, samples.std(correction=1) / samples.numel() ** 0.5

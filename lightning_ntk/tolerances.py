"""The one tolerance that decides whether two computations of a residual or of per-point norms agree.

A leaf module (it imports nothing of the package), so that the Gram path's layouts, the point inference
and the dispatcher's cross-check can share it without an import circle.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["POINTWISE_RTOL", "close"]

# Relative tolerance (and absolute, relative to the largest magnitude) under which two evaluations of
# a residual or two computations of per-point norms count as equal. Float32 rounding is ~1e-6 here;
# a residual that mixes points or a path that does not apply is off by far more.
POINTWISE_RTOL = 1e-4


def close(got: Tensor, want: Tensor) -> bool:
    """``got ≈ want`` within :data:`POINTWISE_RTOL`, absolute part relative to ``max |want|``."""
    want = want.detach().reshape(got.shape)
    scale = want.abs().nan_to_num(0.0, 0.0, 0.0).max() if want.numel() else want.new_zeros(())
    atol = POINTWISE_RTOL * max(float(scale), torch.finfo(want.dtype).tiny)
    return torch.allclose(got.detach(), want, rtol=POINTWISE_RTOL, atol=atol, equal_nan=True)

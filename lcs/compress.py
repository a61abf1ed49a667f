"""Compression operators, shared by training (differentiable) and serving (materialisation).

Shapes: conv weights are [C_out, C_in, kH, kW]; linear weights [out, in].
"""

from __future__ import annotations

import torch


def kept_count(n: int, keep: float) -> int:
    """How many of `n` a keep fraction keeps, at least one: a layer's weights under pruning (keep) or a
    conv's output channels under slicing (width, which keeps the first kept_count(C_out, width))."""
    return max(1, min(n, round(keep * n)))


def topk_mask(weight: torch.Tensor, keep: float) -> torch.Tensor:
    """Per-layer magnitude top-k: a 0/1 mask (weight's dtype) keeping exactly `kept_count` weights.

    Ties are broken by torch.topk, so the count is exact even when magnitudes repeat.
    """
    flat = weight.detach().abs().flatten()
    k = kept_count(flat.numel(), keep)
    mask = torch.zeros_like(flat)
    if k == flat.numel():
        return mask.fill_(1.0).view_as(weight)
    mask.scatter_(0, torch.topk(flat, k, sorted=False).indices, 1.0)
    return mask.view_as(weight)


def quant_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine per-tensor grid covering [lo, hi] (widened to include 0): (scale, zero_point).

    Codes are integers in [0, 2**bits - 1]; x ~= (code - zero_point) * scale.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    levels = 2**bits - 1
    scale = torch.clamp((hi - lo) / levels, min=1e-8)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, levels)
    return scale, zero_point


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes in [0, 2**bits - 1] (as x's float dtype)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)


def fake_quantize(x: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise x on the affine grid over [lo, hi] with a straight-through gradient.

    The forward value takes at most 2**bits distinct values; the backward pass is the identity.
    """
    scale, zero_point = quant_grid(lo.detach(), hi.detach(), bits)
    dequant = (quantize_codes(x, scale, zero_point, bits) - zero_point) * scale
    return x + (dequant - x).detach()


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Weights use their own per-tensor min/max as the range."""
    return fake_quantize(weight, bits, weight.detach().min(), weight.detach().max())

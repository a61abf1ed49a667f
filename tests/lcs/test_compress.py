"""Compression operators: top-k mask, channel slicing counts, the affine fake quantiser."""

from __future__ import annotations

import pytest
import torch

from lcs.compress import (
    fake_quantize,
    fake_quantize_weight,
    kept_count,
    quant_grid,
    quantize_codes,
    topk_mask,
)

# -- top-k -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.025, 0.1, 0.33, 0.5, 0.9, 1.0])
def test_topk_mask_keeps_exactly_k_largest(keep: float) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    mask = topk_mask(w, keep)
    k = kept_count(w.numel(), keep)
    assert mask.shape == w.shape and mask.dtype == w.dtype
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert int(mask.sum()) == k
    kept, dropped = w.abs()[mask == 1], w.abs()[mask == 0]
    if dropped.numel():
        assert kept.min() >= dropped.max()  # magnitude order


@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 0.75])
def test_topk_mask_exact_count_with_ties(keep: float) -> None:
    # every magnitude repeated many times, with signs: a threshold rule would keep too many or too few
    w = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5] * 20).view(12, 10)
    mask = topk_mask(w, keep)
    assert int(mask.sum()) == kept_count(w.numel(), keep)
    # all-equal weights: still exactly k
    flat = torch.full((7, 11), 0.3)
    assert int(topk_mask(flat, keep).sum()) == kept_count(flat.numel(), keep)


def test_topk_mask_has_no_gradient_path_and_keeps_at_least_one() -> None:
    w = torch.randn(4, 4, requires_grad=True)
    mask = topk_mask(w, 0.0001)
    assert not mask.requires_grad
    assert int(mask.sum()) == 1
    assert mask.view(-1)[w.detach().abs().argmax()] == 1


@pytest.mark.parametrize(
    ("n", "keep", "expected"),
    [
        (1000, 0.025, 25),  # weights of a pruned layer
        (100, 0.5, 50),
        (3, 0.01, 1),
        (10, 1.0, 10),
        (8, 1.0, 8),  # output channels of a sliced conv at a width
        (8, 0.25, 2),
        (16, 0.25, 4),
        (16, 0.625, 10),
        (128, 0.25, 32),
        (3, 0.1, 1),
        (8, 0.0, 1),
    ],
)
def test_kept_count(n: int, keep: float, expected: int) -> None:
    assert kept_count(n, keep) == expected


# -- channel slicing ----------------------------------------------------------------------------------


def test_kept_count_of_channels_is_monotonic_in_width() -> None:
    counts = [kept_count(64, w / 100) for w in range(25, 101)]
    assert counts == sorted(counts) and counts[-1] == 64


# -- quantisation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(3, 9))
def test_fake_quantize_at_most_2_to_the_bits_levels(bits: int) -> None:
    torch.manual_seed(bits)
    x = torch.randn(20_000) * 3
    q = fake_quantize(x, bits, x.min(), x.max())
    distinct = q.unique().numel()
    assert distinct <= 2**bits
    assert distinct >= 2 ** (bits - 1)  # the grid is actually used, not collapsed
    scale, _ = quant_grid(x.min(), x.max(), bits)
    assert (q - x).abs().max() <= scale / 2 + 1e-5  # round to nearest inside the range


@pytest.mark.parametrize("bits", range(3, 9))
def test_fake_quantize_weight_levels(bits: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    q = fake_quantize_weight(w, bits)
    assert q.shape == w.shape
    assert q.unique().numel() <= 2**bits


def test_fake_quantize_clamps_outside_the_range() -> None:
    x = torch.tensor([-10.0, 0.0, 0.5, 10.0])
    q = fake_quantize(x, 4, torch.tensor(-1.0), torch.tensor(1.0))
    assert q[0] == pytest.approx(-1.0, abs=0.1) and q[-1] == pytest.approx(1.0, abs=0.1)
    assert q[1] == 0.0


@pytest.mark.parametrize("bits", [3, 5, 8])
def test_fake_quantize_gradient_is_straight_through(bits: int) -> None:
    torch.manual_seed(0)
    x = (torch.randn(1000) * 2).requires_grad_(True)
    upstream = torch.randn(1000)
    # the range is narrower than x: the gradient passes even where the value is clamped
    q = fake_quantize(x, bits, torch.tensor(-1.0), torch.tensor(1.0))
    (q * upstream).sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad, upstream)


def test_fake_quantize_weight_gradient_is_identity() -> None:
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    fake_quantize_weight(w, 3).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize(("lo", "hi"), [(-1.0, 3.0), (0.5, 2.0), (-3.0, -0.2), (0.0, 1.0), (-0.3, 0.0)])
@pytest.mark.parametrize("bits", [3, 8])
def test_quant_grid_includes_zero(lo: float, hi: float, bits: int) -> None:
    scale, zero_point = quant_grid(torch.tensor(lo), torch.tensor(hi), bits)
    assert scale > 0
    assert 0 <= zero_point <= 2**bits - 1
    assert zero_point == torch.round(zero_point)  # an integer code
    # the code for 0.0 decodes back to exactly 0.0 (zero padding and ReLU zeros stay exact)
    code = quantize_codes(torch.tensor(0.0), scale, zero_point, bits)
    assert (code - zero_point) * scale == 0.0
    assert fake_quantize(torch.zeros(3), bits, torch.tensor(lo), torch.tensor(hi)).eq(0).all()
    # the grid covers the (zero-widened) range
    lo_w, hi_w = min(lo, 0.0), max(hi, 0.0)
    assert (0 - zero_point) * scale == pytest.approx(lo_w, abs=float(scale))
    assert (2**bits - 1 - zero_point) * scale == pytest.approx(hi_w, abs=float(scale))


def test_quant_grid_of_a_constant_tensor_is_finite() -> None:
    scale, zero_point = quant_grid(torch.tensor(0.0), torch.tensor(0.0), 8)
    assert torch.isfinite(scale) and scale > 0 and torch.isfinite(zero_point)
    assert torch.isfinite(fake_quantize_weight(torch.zeros(3, 3), 4)).all()

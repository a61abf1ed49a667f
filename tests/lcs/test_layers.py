"""Subspace layers: interpolation on a line, a point ignoring alpha, compression inside a layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lcs.alpha import Level, Schedule
from lcs.compress import kept_count
from lcs.layers import ActRange, Setting, SubspaceConv2d, SubspaceLinear, SubspaceNorm2d, cos2

DENSE = Level("structured", width=1.0)  # full width: the weight is w(alpha) untouched


def _line_conv(role: str = "hidden") -> SubspaceConv2d:
    torch.manual_seed(0)
    return SubspaceConv2d(4, 6, 3, line=True, role=role)  # type: ignore[arg-type]


def test_line_conv_weight_interpolates() -> None:
    conv = _line_conv()
    w0, w1 = conv.weight0.detach(), conv.weight1.detach()
    assert not torch.equal(w0, w1)  # endpoints initialised independently
    assert torch.equal(conv.weight_at(Setting(0.0, DENSE), 4), w0)
    assert torch.equal(conv.weight_at(Setting(1.0, DENSE), 4), w1)
    torch.testing.assert_close(conv.weight_at(Setting(0.5, DENSE), 4), (w0 + w1) / 2)
    torch.testing.assert_close(conv.weight_at(Setting(0.25, DENSE), 4), 0.75 * w0 + 0.25 * w1)


def test_line_linear_and_norm_interpolate() -> None:
    torch.manual_seed(0)
    fc = SubspaceLinear(5, 3, line=True)
    norm = SubspaceNorm2d(5, line=True, norm="batch", grid=1)
    with torch.no_grad():
        for p in (fc.bias0, fc.bias1, norm.weight0, norm.weight1, norm.bias0, norm.bias1):
            p.normal_()
    for alpha in (0.0, 0.5, 1.0):
        s = Setting(alpha, DENSE)
        w, b = fc.weight_at(s, 5)
        torch.testing.assert_close(w, (1 - alpha) * fc.weight0 + alpha * fc.weight1)
        torch.testing.assert_close(b, (1 - alpha) * fc.bias0 + alpha * fc.bias1)
        g, beta = norm.affine_at(s, 5)
        torch.testing.assert_close(g, (1 - alpha) * norm.weight0 + alpha * norm.weight1)
        torch.testing.assert_close(beta, (1 - alpha) * norm.bias0 + alpha * norm.bias1)
    assert torch.equal(fc.weight_at(Setting(0.0, DENSE), 5)[0], fc.weight0)
    assert torch.equal(fc.weight_at(Setting(1.0, DENSE), 5)[1], fc.bias1)


def test_line_conv_output_is_linear_in_the_endpoints() -> None:
    conv = _line_conv("first")  # never compressed
    x = torch.randn(2, 4, 5, 5)
    y0, y1, yh = (conv(x, Setting(a, DENSE)) for a in (0.0, 1.0, 0.5))
    torch.testing.assert_close(yh, (y0 + y1) / 2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y0, F.conv2d(x, conv.weight0, padding=1))


def test_line_gradient_splits_between_endpoints() -> None:
    conv = _line_conv("first")
    x = torch.randn(2, 4, 5, 5)
    conv(x, Setting(0.25, DENSE)).sum().backward()
    assert conv.weight0.grad is not None and conv.weight1.grad is not None
    torch.testing.assert_close(conv.weight0.grad * 0.25, conv.weight1.grad * 0.75)


@pytest.mark.parametrize("kind", ["unstructured", "structured", "quantized"])
def test_point_ignores_alpha(kind: str) -> None:
    torch.manual_seed(0)
    conv = SubspaceConv2d(4, 6, 3, line=False)
    assert conv.weight1 is None
    assert [n for n, _ in conv.named_parameters()] == ["weight0"]
    level = Schedule(kind).level(0.5)  # type: ignore[arg-type]
    x = torch.randn(2, 4, 5, 5)
    outs = [conv(x, Setting(a, level)) for a in (0.0, 0.3, 1.0)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(conv.weight_at(Setting(0.9, DENSE), 4), conv.weight0)


def test_point_norm_and_linear_have_one_endpoint() -> None:
    fc = SubspaceLinear(5, 3, line=False)
    norm = SubspaceNorm2d(5, line=False, norm="group", grid=1)
    assert fc.weight1 is None and fc.bias1 is None and norm.weight1 is None
    assert torch.equal(fc.weight_at(Setting(0.1, DENSE), 5)[0], fc.weight_at(Setting(0.9, DENSE), 5)[0])


# -- compression inside a layer --------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.05, 0.5])
def test_unstructured_hidden_conv_is_masked_and_masked_weights_get_no_gradient(keep: float) -> None:
    conv = _line_conv()
    s = Setting(0.3, Level("unstructured", keep=keep))
    w = conv.weight_at(s, 4)
    assert int((w != 0).sum()) == kept_count(w.numel(), keep)
    conv(torch.randn(2, 4, 5, 5), s).pow(2).sum().backward()
    for grad in (conv.weight0.grad, conv.weight1.grad):
        assert grad is not None
        assert grad[w == 0].abs().max() == 0.0  # pruned: no gradient
        assert grad[w != 0].abs().max() > 0.0


def test_first_layer_is_never_pruned_or_quantised() -> None:
    conv = _line_conv("first")
    for level in (Level("unstructured", keep=0.05), Level("quantized", bits=3)):
        torch.testing.assert_close(conv.weight_at(Setting(0.4, level), 4), 0.6 * conv.weight0 + 0.4 * conv.weight1)
    assert conv.act is None


@pytest.mark.parametrize("width", [0.25, 0.5, 0.75, 1.0])
def test_structured_conv_slices_leading_channels(width: float) -> None:
    conv = _line_conv()
    s = Setting(0.0, Level("structured", width=width))
    c_out = kept_count(6, width)
    w = conv.weight_at(s, 2)
    assert w.shape == (c_out, 2, 3, 3)
    assert torch.equal(w, conv.weight0[:c_out, :2])  # the first channels, no re-ordering
    assert conv(torch.randn(1, 2, 5, 5), s).shape == (1, c_out, 5, 5)


@pytest.mark.parametrize("bits", [3, 8])
def test_quantized_hidden_conv_weight_levels(bits: int) -> None:
    conv = _line_conv()
    w = conv.weight_at(Setting(0.5, Level("quantized", bits=bits)), 4)
    assert w.unique().numel() <= 2**bits
    assert not torch.equal(w, 0.5 * (conv.weight0 + conv.weight1))


def test_act_range_tracks_in_training_only_and_quantises_after() -> None:
    act = ActRange(momentum=0.5)
    s = Setting(1.0, Level("quantized", bits=3))
    x = torch.linspace(-1.0, 3.0, 100)
    act.eval()
    assert torch.equal(act(x, s), x)  # nothing seen yet: identity
    assert int(act.seen) == 0
    act.train()
    act(x, s)
    assert (float(act.lo), float(act.hi), int(act.seen)) == (-1.0, 3.0, 1)
    act(x * 2, s)  # EMA with momentum 0.5
    assert float(act.lo) == pytest.approx(-1.5) and float(act.hi) == pytest.approx(4.5)
    act.eval()
    q = act(x, s)
    assert q.unique().numel() <= 8
    assert torch.equal(act(x, Setting(1.0, s.level, quantize_acts=False)), x)


# -- normalisation ---------------------------------------------------------------------------------


def test_batchnorm_calibration_is_a_cumulative_mean_per_row() -> None:
    norm = SubspaceNorm2d(3, line=False, norm="batch", grid=2)
    norm.eval()
    xs = [torch.randn(8, 3, 4, 4) * (i + 1) + i for i in range(3)]
    for n, x in enumerate(xs):
        norm(x, Setting(1.0, DENSE, stats=1, calibrate=n))
    expected_mean = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
    expected_var = torch.stack([x.var(dim=(0, 2, 3)) for x in xs]).mean(0)
    torch.testing.assert_close(norm.running_mean[1], expected_mean)
    torch.testing.assert_close(norm.running_var[1], expected_var)
    assert torch.equal(norm.running_mean[0], torch.zeros(3))  # the other row is untouched
    # a narrower slice calibrates only its leading channels
    norm(torch.randn(4, 2, 4, 4) + 5, Setting(0.0, DENSE, stats=0, calibrate=0))
    assert norm.running_mean[0, :2].min() > 4 and norm.running_mean[0, 2] == 0


def test_batchnorm_needs_a_row_to_calibrate_or_to_run_in_eval() -> None:
    norm = SubspaceNorm2d(3, line=False, norm="batch", grid=1)
    with pytest.raises(ValueError, match="stats"):
        norm(torch.randn(2, 3, 4, 4), Setting(1.0, DENSE, calibrate=0))
    with pytest.raises(ValueError, match="stats"):
        norm.stats_at(Setting(1.0, DENSE), 3)


def test_groupnorm_has_no_statistics_and_matches_torch() -> None:
    norm = SubspaceNorm2d(16, line=False, norm="group", grid=3)
    assert not hasattr(norm, "running_mean") or norm.running_mean is None
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(norm(x, Setting(0.0, DENSE)), F.group_norm(x, 8, norm.weight0, norm.bias0))
    torch.testing.assert_close(norm(x[:, :4], Setting(0.0, DENSE)), F.group_norm(x[:, :4], 4, None, None))


def test_cos2() -> None:
    a = torch.tensor([1.0, 0.0, 0.0])
    assert float(cos2(a, torch.tensor([0.0, 2.0, 0.0]))) == pytest.approx(0.0)
    assert float(cos2(a, -3 * a)) == pytest.approx(1.0)
    assert float(cos2(a, torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(0.5)

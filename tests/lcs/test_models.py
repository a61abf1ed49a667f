"""The subspace ResNet: export parity with the subspace forward, slicing shapes, the line regulariser."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lcs.alpha import Schedule
from lcs.compress import kept_count
from lcs.layers import Setting, SubspaceConv2d, SubspaceLinear, cos2
from lcs.models import SUBSPACE_ARGS, PlainBlock, SubspaceResNet, arch_args, build_model, model_names, subspace_kwargs

GRID = (0.0, 0.3, 0.7, 1.0)  # statistics grid of the test models: 3/4/7/8 bits, widths 0.25..1
IMAGE = 12
KINDS = ["unstructured", "structured", "quantized"]
SUBSPACES = ["line", "point"]

Factory = Callable[..., SubspaceResNet]


def _x(n: int = 8, seed: int = 123) -> torch.Tensor:
    return torch.randn(n, 1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("subspace", SUBSPACES)
@pytest.mark.parametrize("kind", KINDS)
def test_export_matches_subspace_forward(settled_model: Factory, kind: str, subspace: str, norm: str) -> None:
    model = settled_model(kind, subspace, norm, GRID)
    x = _x()
    outputs = []
    with torch.no_grad():
        for alpha in GRID:
            s = model.at(alpha)
            expected = model(x, s)
            plain = model.export(s)
            assert not any(isinstance(m, SubspaceConv2d | SubspaceLinear) for m in plain.modules())
            assert not plain.training
            assert all(not p.requires_grad for p in plain.parameters())
            torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=0)
            outputs.append(expected)
    # the grid alphas are genuinely different networks (otherwise parity would prove little)
    assert not torch.allclose(outputs[0], outputs[-1], atol=1e-3)


@pytest.mark.parametrize(
    ("blocks", "norms_left"),
    [
        ((1, 1, 1), [True, True, False, False]),  # the third block's norm1 and the final norm fold
        ((1, 2, 1), [True, True, True, True, False]),  # the 2nd stage's second block adds its raw input
    ],
)
def test_export_folds_each_batchnorm_that_reads_only_a_block_with_a_shortcut_convolution(
    blocks: tuple[int, ...], norms_left: list[bool]
) -> None:
    """A block with a shortcut convolution outputs the sum of two convolutions, so a BatchNorm that reads
    nothing else folds into them; a BatchNorm whose block also adds its raw input to its output cannot."""
    torch.manual_seed(0)
    model = SubspaceResNet(widths=(4, 8, 16)[: len(blocks)], blocks=blocks, stem_stride=2)
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms that are not the identity
            if p.ndim == 1:
                p.uniform_(0.5, 1.5) if name.rsplit(".", 1)[1].startswith("weight") else p.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):  # running statistics that are not 0 and 1
            model(2 + 3 * _x(16), Setting(1.0, model.schedule.level(1.0)))
    model.eval()
    s = model.at(1.0)
    plain = model.export(s)
    blocks = [m for m in plain if isinstance(m, PlainBlock)]
    final_norm = any(isinstance(m, nn.BatchNorm2d) for m in plain)  # top level: after the last block
    assert [isinstance(b.norm1, nn.BatchNorm2d) for b in blocks] + [final_norm] == norms_left
    assert all(b.norm1 is None for b, left in zip(blocks, norms_left, strict=False) if not left)  # gone
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x, s), atol=1e-5, rtol=0)


def test_export_uses_the_calibrated_statistics(settled_model: Factory) -> None:
    model = settled_model("structured", "line", "batch")
    x = _x()
    with torch.no_grad():
        before = model.export(model.at(1.0))(x)
        model.blocks[0].norm1.running_mean.add_(1.0)  # every row
        after_export = model.export(model.at(1.0))(x)
        after_model = model(x, model.at(1.0))
    assert not torch.allclose(before, after_export, atol=1e-3)
    torch.testing.assert_close(after_export, after_model, atol=1e-5, rtol=0)


def test_model_forward_does_not_depend_on_a_stored_alpha(settled_model: Factory) -> None:
    """Alpha is an argument: interleaving two alphas on one model gives the same answers."""
    model = settled_model("unstructured", "line", "batch")
    x = _x()
    with torch.no_grad():
        a0 = model(x, model.at(0.0))
        a1 = model(x, model.at(1.0))
        assert torch.equal(model(x, model.at(0.0)), a0)
        assert torch.equal(model(x, model.at(1.0)), a1)


@pytest.mark.parametrize("alpha", GRID)
@pytest.mark.parametrize("subspace", SUBSPACES)
def test_structured_shapes_at_several_widths(settled_model: Factory, subspace: str, alpha: float) -> None:
    model = settled_model("structured", subspace, "batch", GRID)
    s = model.at(alpha)
    width = s.level.width
    c1, c2 = kept_count(8, width), kept_count(16, width)
    x = _x(2)
    with torch.no_grad():
        assert model.features(x, s).shape == (2, c2)
        assert model(x, s).shape == (2, 4)  # the class count never shrinks
        plain = model.export(s)
        assert plain(x).shape == (2, 4)
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1 and convs[0].out_channels == c1  # the stem keeps its input channels
    assert {c.out_channels for c in convs} == {c1, c2}
    exported = sum(c.weight.numel() for c in convs)
    full = sum(m.weight0.numel() for m in model.modules() if isinstance(m, SubspaceConv2d))
    assert exported < full if width < 1.0 else exported == full  # physically smaller tensors
    fc = plain[-1]
    assert isinstance(fc, nn.Linear) and (fc.in_features, fc.out_features) == (c2, 4)
    if width == 1.0:
        assert {c.out_channels for c in convs} == {8, 16}


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_unstructured_export_is_sparse(settled_model: Factory, alpha: float) -> None:
    model = settled_model("unstructured", "line", "group")  # group: no BatchNorm folded into weights
    s = model.at(alpha)
    plain = model.export(s)
    hidden = [m for name, m in plain.named_modules() if isinstance(m, nn.Conv2d) and name != "0"]
    assert hidden
    for conv in hidden:
        assert int((conv.weight != 0).sum()) == kept_count(conv.weight.numel(), s.level.keep)
    stem = plain[0]
    assert isinstance(stem, nn.Conv2d) and bool((stem.weight != 0).all())  # the first conv stays dense


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_quantized_export_weights_on_a_low_bit_grid(settled_model: Factory, alpha: float) -> None:
    model = settled_model("quantized", "point", "group")
    s = model.at(alpha)
    plain = model.export(s)
    hidden = [m for name, m in plain.named_modules() if isinstance(m, nn.Conv2d) and name != "0"]
    for conv in hidden:
        assert conv.weight.unique().numel() <= 2**s.level.bits
    assert torch.equal(plain[0].weight, model.stem.weight0)  # the stem stays in float


def test_at_uses_the_schedule_and_the_statistics_row(tiny_model: Factory) -> None:
    model = tiny_model("quantized", "line", "batch", GRID)
    for row, alpha in enumerate(GRID):
        s = model.at(alpha)
        assert s.alpha == alpha and s.stats == row and s.calibrate is None
        assert s.level == model.schedule.level(alpha)
    with pytest.raises(ValueError, match="grid alphas"):
        model.at(0.5)  # no statistics for it
    group = tiny_model("quantized", "line", "group")
    assert group.at(0.5).stats is None  # GroupNorm: any alpha


@pytest.mark.parametrize("alpha", [float("nan"), -0.1, 1.1])
def test_at_rejects_invalid_alpha(tiny_model: Factory, alpha: float) -> None:
    with pytest.raises(ValueError):
        tiny_model("structured", "line", "group").at(alpha)


def test_subspace_cos2_is_zero_for_a_point(tiny_model: Factory) -> None:
    model = tiny_model("structured", "point", "batch")
    assert float(model.subspace_cos2().detach()) == 0.0


def test_subspace_cos2_of_a_line_matches_a_manual_sum(tiny_model: Factory) -> None:
    model = tiny_model("structured", "line", "batch")
    manual = 0.0
    layers = 0
    for m in model.modules():
        if isinstance(m, SubspaceConv2d | SubspaceLinear):
            a, b = m.weight0.detach().flatten().double(), m.weight1.detach().flatten().double()
            manual += float((a @ b) ** 2 / ((a @ a) * (b @ b)))
            layers += 1
    assert layers == 7  # stem, 2 x (conv1, conv2), 1 shortcut, fc
    value = model.subspace_cos2().detach()
    assert float(value) == pytest.approx(manual, rel=1e-4)
    assert 0.0 < float(value) < layers
    # identical endpoints: cos^2 = 1 per layer
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SubspaceConv2d | SubspaceLinear):
                m.weight1.copy_(-2 * m.weight0)
    assert float(model.subspace_cos2().detach()) == pytest.approx(layers, rel=1e-5)


def test_subspace_cos2_gradient_pushes_endpoints_apart(tiny_model: Factory) -> None:
    model = tiny_model("structured", "line", "batch")
    fc = model.fc
    before = float(cos2(fc.weight0, fc.weight1).detach())
    model.subspace_cos2().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad)
    assert float(cos2(fc.weight0, fc.weight1).detach()) < before


def test_training_forward_uses_batch_statistics_and_backpropagates(tiny_model: Factory) -> None:
    model = tiny_model("unstructured", "line", "batch")
    model.train()
    out = model(_x(4), Setting(0.5, model.schedule.level(0.5)))
    out.sum().backward()
    assert model.stem.weight0.grad is not None and model.stem.weight1.grad is not None
    assert model.blocks[0].norm1.running_mean.eq(0).all()  # training never writes the grid


def test_registry() -> None:
    assert {"tiny_resnet", "preact_resnet"} <= set(model_names())
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet9000")
    with pytest.raises(ValueError, match="same length"):
        build_model("tiny_resnet", widths=(8, 16), blocks=(1,))
    big = build_model("preact_resnet", line=False)
    assert big.fc.c_in == 128


def _subspace_kwargs(arch_kwargs: dict[str, object]) -> dict[str, object]:
    schedule = Schedule("quantized")
    return subspace_kwargs(
        arch_kwargs, in_channels=3, num_classes=7, subspace="point", norm="group", stat_alphas=[0, 1], schedule=schedule
    )


def test_subspace_kwargs_add_the_data_and_the_method_to_the_architecture_s_own() -> None:
    kwargs = _subspace_kwargs({"widths": (8, 16), "blocks": (1, 1)})
    assert set(kwargs) == {"widths", "blocks", *SUBSPACE_ARGS}
    assert set(arch_args()) | set(SUBSPACE_ARGS) == set(inspect.signature(SubspaceResNet).parameters)
    model = build_model("tiny_resnet", **kwargs)
    assert (model.stem.c_in, model.fc.c_out, model.line, model.norm_type) == (3, 7, False, "group")
    assert model.stat_alphas == (0.0, 1.0) and model.schedule == Schedule("quantized")


@pytest.mark.parametrize("name", SUBSPACE_ARGS)
def test_architecture_kwargs_may_not_set_what_the_data_or_the_method_sets(name: str) -> None:
    """Training's make_model raised a TypeError for arch_kwargs={norm: group}; a checkpoint with the same
    arch.kwargs loaded with its norm field silently winning. Both build through subspace_kwargs, which refuses."""
    with pytest.raises(ValueError, match=rf"set \['{name}'\], which the data and the compression method set"):
        _subspace_kwargs({"widths": (8, 16), name: None})


def test_param_count_of_a_line_is_twice_a_point(tiny_model: Factory) -> None:
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(tiny_model("structured", "line", "batch")) == 2 * count(tiny_model("structured", "point", "batch"))

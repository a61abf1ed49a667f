"""Architecture registry: a model is a name plus keyword arguments.

Every model here is a subspace model: `model(x, setting)` runs it at one alpha, and
`model.export(setting)` returns a plain torch network with the same numerics (weights interpolated,
sliced, masked or fake-quantised, BatchNorm folded into the conv that precedes it where one does).
Shapes: inputs [N, C, H, W], logits [N, num_classes].
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lcs.alpha import Schedule, SubspaceType, check_alpha, spelled
from lcs.compress import fake_quantize
from lcs.layers import NormType, Setting, SubspaceConv2d, SubspaceLinear, SubspaceNorm2d, cos2, groups

# --------------------------------------------------------------------------------------------------
# plain (exported) modules: what the service runs


class ActQuant(nn.Module):
    """Fixed-range fake quantisation of activations, as trained (simulated low-bit activations)."""

    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("lo", lo.detach().clone())
        self.register_buffer("hi", hi.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.bits, self.lo, self.hi)


class PlainBlock(nn.Module):
    """Pre-activation residual block with fixed weights: x + conv2(relu(conv1'(relu(norm1(x)))))."""

    def __init__(
        self,
        norm1: nn.Module | None,
        conv1: nn.Module,
        conv2: nn.Conv2d,
        shortcut: nn.Module | None,
        act1: nn.Module,
        act2: nn.Module,
    ) -> None:
        super().__init__()
        self.norm1, self.act1, self.conv1, self.act2, self.conv2 = norm1, act1, conv1, act2, conv2
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.act1(F.relu(x if self.norm1 is None else self.norm1(x)))  # None: folded into the block before
        sc = x if self.shortcut is None else self.shortcut(o)
        o = self.conv2(self.act2(F.relu(self.conv1(o))))
        return o + sc


def _plain_conv(w: torch.Tensor, stride: int, bias: torch.Tensor | None = None) -> nn.Conv2d:
    conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[2], stride=stride, padding=w.shape[2] // 2, bias=bias is not None)
    conv.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    if bias is not None:
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return conv


def _plain_norm(norm: SubspaceNorm2d, s: Setting, c: int) -> nn.Module:
    w, b = norm.affine_at(s, c)
    if norm.norm == "group":
        gn = nn.GroupNorm(groups(c), c, eps=norm.eps)
        gn.weight, gn.bias = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
        return gn
    bn = nn.BatchNorm2d(c, eps=norm.eps)
    mean, var = norm.stats_at(s, c)
    bn.weight, bn.bias = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    bn.running_mean = mean.detach().clone()
    bn.running_var = var.detach().clone()
    return bn.eval()


def _fold(conv_w: torch.Tensor, norm: SubspaceNorm2d, s: Setting) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval BatchNorm that directly follows a conv into the conv's weight and bias."""
    c = conv_w.shape[0]
    gamma, beta = norm.affine_at(s, c)
    mean, var = norm.stats_at(s, c)
    scale = gamma / torch.sqrt(var + norm.eps)  # [C_out]
    return conv_w * scale[:, None, None, None], beta - mean * scale


# --------------------------------------------------------------------------------------------------
# subspace modules: what training optimises


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, *, line: bool, norm: NormType, grid: int) -> None:
        super().__init__()
        self.norm1 = SubspaceNorm2d(c_in, line=line, norm=norm, grid=grid)
        self.conv1 = SubspaceConv2d(c_in, c_out, 3, stride=stride, line=line)
        self.norm2 = SubspaceNorm2d(c_out, line=line, norm=norm, grid=grid)
        self.conv2 = SubspaceConv2d(c_out, c_out, 3, line=line)
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut = SubspaceConv2d(c_in, c_out, 1, stride=stride, line=line) if needs_projection else None

    def forward(self, x: torch.Tensor, s: Setting) -> torch.Tensor:
        o = F.relu(self.norm1(x, s))
        sc = x if self.shortcut is None else self.shortcut(o, s)
        o = self.conv1(o, s)
        o = self.conv2(F.relu(self.norm2(o, s)), s)
        return o + sc

    def export(self, s: Setting, c_in: int) -> tuple[PlainBlock, int]:
        quant = s.level.kind == "quantized"

        def act(conv: SubspaceConv2d) -> nn.Module:
            if quant and s.quantize_acts and conv.act is not None and int(conv.act.seen) > 0:
                return ActQuant(conv.act.lo, conv.act.hi, s.level.bits)
            return nn.Identity()

        w1 = self.conv1.weight_at(s, c_in)
        c_mid = w1.shape[0]
        w2 = self.conv2.weight_at(s, c_mid)
        if self.norm2.norm == "batch":
            w1f, b1f = _fold(w1, self.norm2, s)
            conv1: nn.Module = _plain_conv(w1f, self.conv1.stride, b1f)
        else:
            conv1 = nn.Sequential(_plain_conv(w1, self.conv1.stride), _plain_norm(self.norm2, s, c_mid))
        shortcut = None
        if self.shortcut is not None:
            shortcut = _plain_conv(self.shortcut.weight_at(s, c_in), self.shortcut.stride)
        block = PlainBlock(
            _plain_norm(self.norm1, s, c_in), conv1, _plain_conv(w2, 1), shortcut, act(self.conv1), act(self.conv2)
        )  # type: ignore[arg-type]
        # the shortcut (a hidden 1x1 conv) sees the same quantised input as conv1 in training
        return block, w2.shape[0]


class SubspaceResNet(nn.Module):
    """Pre-activation ResNet for small images (28x28 or 32x32), every layer a subspace layer."""

    def __init__(
        self,
        *,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (32, 64, 128),
        blocks: Sequence[int] = (1, 1, 1),
        stem_stride: int = 1,
        line: bool = True,
        norm: NormType = "batch",
        stat_alphas: Sequence[float] = (1.0,),
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__()
        check_arch_kwargs({"widths": widths, "blocks": blocks, "stem_stride": stem_stride})
        if len(widths) != len(blocks):
            raise ValueError(f"widths {widths} and blocks {blocks} need the same length (one per stage)")
        self.line, self.norm_type = line, norm
        self.schedule = schedule or Schedule("structured")
        self.stat_alphas = tuple(check_alpha(a) for a in stat_alphas)
        grid = len(self.stat_alphas)
        self.stem = SubspaceConv2d(in_channels, widths[0], 3, stride=stem_stride, line=line, role="first")
        layers: list[PreActBlock] = []
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(PreActBlock(c, w, stride, line=line, norm=norm, grid=grid))
                c = w
        self.blocks = nn.ModuleList(layers)
        self.norm = SubspaceNorm2d(c, line=line, norm=norm, grid=grid)
        self.fc = SubspaceLinear(c, num_classes, line=line)

    # -- where in the subspace -----------------------------------------------------------------

    def stats_index(self, alpha: float) -> int | None:
        """Row of the BatchNorm statistics grid for alpha (None for GroupNorm, which has none)."""
        if self.norm_type != "batch":
            return None
        if (row := spelled(alpha, self.stat_alphas)) is not None:
            return self.stat_alphas.index(row)
        raise ValueError(
            f"alpha {alpha} has no BatchNorm statistics in this checkpoint; "
            f"use one of its grid alphas {list(self.stat_alphas)}"
        )

    def at(self, alpha: float) -> Setting:
        """The eval-mode Setting for alpha: its schedule level and its statistics row."""
        a = check_alpha(alpha)
        return Setting(alpha=a, level=self.schedule.level(a), stats=self.stats_index(a))

    # -- forward -------------------------------------------------------------------------------

    def features(self, x: torch.Tensor, s: Setting) -> torch.Tensor:
        o = self.stem(x, s)
        for block in self.blocks:
            o = block(o, s)
        o = F.relu(self.norm(o, s))
        return o.mean(dim=(2, 3))  # [N, C']

    def forward(self, x: torch.Tensor, s: Setting) -> torch.Tensor:
        return self.fc(self.features(x, s), s)

    def subspace_cos2(self) -> torch.Tensor:
        """Sum over conv/linear layers of cos^2(w0, w1); zero for a point."""
        total = torch.zeros(())
        if not self.line:
            return total
        for m in self.modules():
            if isinstance(m, SubspaceConv2d | SubspaceLinear):
                assert m.weight1 is not None
                total = total + cos2(m.weight0, m.weight1)
        return total

    @torch.no_grad()
    def export(self, s: Setting) -> nn.Sequential:
        """A plain network (nn.Conv2d/BatchNorm2d/Linear) computing the same function as self(x, s)."""
        in_ch = self.stem.c_in
        stem_w = self.stem.weight_at(s, in_ch)
        layers: list[nn.Module] = [_plain_conv(stem_w, self.stem.stride)]
        c = stem_w.shape[0]
        for block in self.blocks:
            plain, c = block.export(s, c)  # type: ignore[operator]
            layers.append(plain)
        fc_w, fc_b = self.fc.weight_at(s, c)
        fc = nn.Linear(c, fc_w.shape[0])
        fc.weight, fc.bias = nn.Parameter(fc_w.clone()), nn.Parameter(fc_b.clone())
        layers += [_plain_norm(self.norm, s, c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc]
        _fold_norms_into_blocks(layers)
        return nn.Sequential(*layers).eval().requires_grad_(False)


def _fold_norms_into_blocks(layers: list[nn.Module]) -> None:
    """Fold each BatchNorm that reads nothing but a block's output into that block, in place.

    A block with a convolution shortcut outputs conv2(.) + shortcut(.), both linear, so a BatchNorm that
    follows, channel by channel y = a * out + b, equals conv2 and shortcut with their weights times a, plus
    b as conv2's bias. That BatchNorm is the next block's norm1 when the next block has a shortcut
    convolution of its own (one without adds its raw input, so the norm must stay), or the final norm;
    it goes (norm1 None, the final norm out of the list), so the add meets the ReLU after it directly,
    which int8 fuses into one op. Here: the last two of four norms. Measured through `service`'s build
    at alpha 1, batch 32 (one-off, 16 alternating rounds): quantized_line's int8 network 1.111 -> 1.093
    ms at 2 threads and 2.006 -> 1.989 at 1; structured_line's float network on ONNX Runtime 2.788 ->
    2.772 at 2 threads. Kept in as an Identity instead, the int8 network was 2 % slower than unfolded."""
    for block, after in list(itertools.pairwise(layers)):
        if not (isinstance(block, PlainBlock) and isinstance(block.shortcut, nn.Conv2d)):
            continue
        reader, norm = (after, after.norm1) if isinstance(after, PlainBlock) else (None, after)
        if not isinstance(norm, nn.BatchNorm2d) or (reader is not None and reader.shortcut is None):
            continue
        assert norm.running_var is not None and norm.running_mean is not None
        conv2, shortcut = block.conv2, block.shortcut
        with torch.no_grad():
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            bias = shift if conv2.bias is None else conv2.bias * scale + shift
            conv2.weight = nn.Parameter(conv2.weight * scale[:, None, None, None], requires_grad=False)
            shortcut.weight = nn.Parameter(shortcut.weight * scale[:, None, None, None], requires_grad=False)
            conv2.bias = nn.Parameter(bias, requires_grad=False)
        if reader is None:
            layers.remove(norm)
        else:
            reader.norm1 = None


# --------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, Callable[..., SubspaceResNet]] = {}


def register(fn: Callable[..., SubspaceResNet]) -> Callable[..., SubspaceResNet]:
    _REGISTRY[fn.__name__] = fn
    return fn


def model_names() -> list[str]:
    return sorted(_REGISTRY)


# The SubspaceResNet arguments that the data (image channels, classes) and the method (subspace, normalisation,
# statistics grid, schedule) set: an architecture's own kwargs (training's arch_kwargs, a checkpoint's
# arch.kwargs) may set only the others, `arch_args()`.
SUBSPACE_ARGS = ("in_channels", "num_classes", "line", "norm", "stat_alphas", "schedule")


def arch_args() -> list[str]:
    """The arguments an architecture's kwargs may set: widths, blocks, stem_stride."""
    return [n for n in inspect.signature(SubspaceResNet).parameters if n not in SUBSPACE_ARGS]


def check_arch_kwargs(arch_kwargs: Mapping[str, Any]) -> None:
    """Refuse (ValueError) architecture kwargs that set one of SUBSPACE_ARGS, rather than let either side win,
    and stage sizes that build a network that cannot run: widths and blocks must be non-empty lists of positive
    integers, stem_stride a positive integer (0 or -1 built, then failed at the first step with a RuntimeError;
    a negative block count built a stage with no blocks without a word). SubspaceResNet checks its own."""
    clash = [k for k in SUBSPACE_ARGS if k in arch_kwargs]
    if clash:
        raise ValueError(
            f"architecture kwargs set {clash}, which the data and the compression method set; "
            f"they may set only {arch_args()}"
        )
    for name, what in (("widths", "channels"), ("blocks", "residual blocks")):
        v = arch_kwargs.get(name, [1])
        if isinstance(v, str | bytes) or not isinstance(v, Sequence) or not v or not all(map(_positive_int, v)):
            raise ValueError(
                f"{name} must be a non-empty list of positive integers (the {what} of each stage), got {v!r}"
            )
    if not _positive_int(stride := arch_kwargs.get("stem_stride", 1)):
        raise ValueError(f"stem_stride must be a positive integer (1: full resolution, 2: half), got {stride!r}")


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def subspace_kwargs(
    arch_kwargs: Mapping[str, Any],
    *,
    in_channels: int,
    num_classes: int,
    subspace: SubspaceType,
    norm: NormType,
    stat_alphas: Sequence[float],
    schedule: Schedule,
) -> dict[str, Any]:
    """Every keyword argument of `build_model`: the architecture's own, then those the data and the method
    set (SUBSPACE_ARGS). What training builds and what a checkpoint rebuilds, so the two cannot differ."""
    check_arch_kwargs(arch_kwargs)
    return {
        **arch_kwargs,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "line": subspace == "line",
        "norm": norm,
        "stat_alphas": stat_alphas,
        "schedule": schedule,
    }


def build_model(name: str, **kwargs: Any) -> SubspaceResNet:
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture {name!r}; registered: {model_names()}")
    return _REGISTRY[name](**kwargs)


@register
def preact_resnet(**kwargs: Any) -> SubspaceResNet:
    """Default: ~0.3M parameters per endpoint; a stride-2 stem puts the three stages at 14, 7 and 4
    pixels for 28x28 inputs (4x cheaper than a stride-1 stem: 24 vs 104 s per training epoch here)."""
    return SubspaceResNet(**{"widths": (32, 64, 128), "blocks": (1, 1, 1), "stem_stride": 2, **kwargs})


@register
def tiny_resnet(**kwargs: Any) -> SubspaceResNet:
    """For tests: two stages of 8 and 16 channels, builds and runs in milliseconds."""
    return SubspaceResNet(**{"widths": (8, 16), "blocks": (1, 1), "stem_stride": 2, **kwargs})

"""Subspace layers: weights that live on a point (LCS+P) or a line (LCS+L) and take alpha as an argument.

Nothing here stores alpha. Every forward receives a `Setting` that says where in the subspace it runs
and how it is compressed, so two threads may run two alphas of one module at the same time in eval mode.
Training-only buffer updates (BatchNorm calibration, activation ranges) happen only when the Setting or
`module.training` asks for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lcs.alpha import Level
from lcs.compress import fake_quantize, fake_quantize_weight, kept_count, topk_mask

Role = Literal["first", "hidden"]  # the first conv is never pruned or quantised (nor is SubspaceLinear, the classifier)
NormType = Literal["batch", "group"]


@dataclass(frozen=True)
class Setting:
    """Where a forward pass runs in the subspace.

    alpha: the coordinate on the line (unused by a point). level: the compression to apply, usually
    schedule.level(alpha), but training warms it up separately. stats: row of the BatchNorm statistics
    grid to normalise with, or None for batch statistics (training). calibrate: accumulate this batch's
    statistics into row `stats` as the n-th sample (cumulative mean). quantize_acts: quantise the
    inputs of hidden layers (quantized kind, after the activation-range warm-up).
    """

    alpha: float
    level: Level
    stats: int | None = None
    calibrate: int | None = None
    quantize_acts: bool = True


def groups(channels: int) -> int:
    """GroupNorm groups for `channels` (sliced widths included): up to 8, always a divisor."""
    return math.gcd(channels, 8)


def _interp(p0: torch.Tensor, p1: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """w(alpha) = (1 - alpha) * w0 + alpha * w1 on a line; w0 on a point."""
    if p1 is None:
        return p0
    return torch.lerp(p0, p1, alpha)


class _Endpoints(nn.Module):
    """Owns the endpoint parameters of one tensor: `<name>0` and, on a line, `<name>1`."""

    def _endpoints(self, name: str, shape: tuple[int, ...], line: bool, init: str) -> None:
        for i in range(2 if line else 1):
            p = nn.Parameter(torch.empty(shape))
            if init == "kaiming":
                nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")
            elif init == "ones":
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
            self.register_parameter(f"{name}{i}", p)
        if not line:
            self.register_parameter(f"{name}1", None)

    def _at(self, name: str, alpha: float) -> torch.Tensor:
        return _interp(getattr(self, f"{name}0"), getattr(self, f"{name}1"), alpha)


class ActRange(nn.Module):
    """Running min/max of a layer's input, for activation quantisation (EMA during training)."""

    lo: torch.Tensor
    hi: torch.Tensor
    seen: torch.Tensor

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, s: Setting) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                lo, hi = x.min(), x.max()
                if int(self.seen) == 0:
                    self.lo.copy_(lo)
                    self.hi.copy_(hi)
                else:
                    self.lo.lerp_(lo, self.momentum)
                    self.hi.lerp_(hi, self.momentum)
                self.seen += 1
        if not s.quantize_acts or int(self.seen) == 0:
            return x
        return fake_quantize(x, s.level.bits, self.lo, self.hi)


class SubspaceConv2d(_Endpoints):
    """A bias-free conv whose weight is w(alpha), compressed per `Setting.level`."""

    weight0: torch.Tensor
    weight1: torch.Tensor | None

    def __init__(
        self, c_in: int, c_out: int, kernel: int, *, stride: int = 1, line: bool, role: Role = "hidden"
    ) -> None:
        super().__init__()
        self.c_in, self.c_out, self.kernel, self.stride, self.role = c_in, c_out, kernel, stride, role
        self.padding = kernel // 2
        self._endpoints("weight", (c_out, c_in, kernel, kernel), line, "kaiming")
        self.act = ActRange() if role == "hidden" else None

    def out_channels(self, level: Level) -> int:
        return kept_count(self.c_out, level.width) if level.kind == "structured" else self.c_out

    def weight_at(self, s: Setting, c_in: int) -> torch.Tensor:
        """The effective weight [C_out', c_in, k, k] at this setting (sliced, masked or fake-quantised)."""
        w = self._at("weight", s.alpha)[: self.out_channels(s.level), :c_in]
        if self.role == "hidden":
            if s.level.kind == "unstructured":
                w = w * topk_mask(w, s.level.keep)
            elif s.level.kind == "quantized":
                w = fake_quantize_weight(w, s.level.bits)
        return w

    def forward(self, x: torch.Tensor, s: Setting) -> torch.Tensor:
        if self.act is not None and s.level.kind == "quantized":
            x = self.act(x, s)
        return F.conv2d(x, self.weight_at(s, x.shape[1]), None, self.stride, self.padding)


class SubspaceLinear(_Endpoints):
    """The classifier: input features follow the previous layer's width; outputs are fixed; never compressed."""

    weight0: torch.Tensor
    weight1: torch.Tensor | None

    def __init__(self, c_in: int, c_out: int, *, line: bool) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self._endpoints("weight", (c_out, c_in), line, "zeros")
        self._endpoints("bias", (c_out,), line, "zeros")
        for i in range(2 if line else 1):  # default nn.Linear init, per endpoint
            nn.init.kaiming_uniform_(getattr(self, f"weight{i}"), a=math.sqrt(5))

    def weight_at(self, s: Setting, c_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._at("weight", s.alpha)[:, :c_in], self._at("bias", s.alpha)

    def forward(self, x: torch.Tensor, s: Setting) -> torch.Tensor:
        w, b = self.weight_at(s, x.shape[1])
        return F.linear(x, w, b)


class SubspaceNorm2d(_Endpoints):
    """BatchNorm with one row of running statistics per grid alpha, or alpha-free GroupNorm.

    BatchNorm statistics depend on alpha (width, sparsity, bits and position on the line all change
    the activations), so they are estimated per alpha after training (`Setting.calibrate`) and stored
    as running_mean/var of shape [G, C] for the G alphas of the model's statistics grid.
    """

    running_mean: torch.Tensor  # [G, C]
    running_var: torch.Tensor  # [G, C]

    def __init__(self, channels: int, *, line: bool, norm: NormType, grid: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.norm, self.eps = channels, norm, eps
        self._endpoints("weight", (channels,), line, "ones")
        self._endpoints("bias", (channels,), line, "zeros")
        if norm == "batch":
            self.register_buffer("running_mean", torch.zeros(grid, channels))
            self.register_buffer("running_var", torch.ones(grid, channels))

    def affine_at(self, s: Setting, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._at("weight", s.alpha)[:c], self._at("bias", s.alpha)[:c]

    def forward(self, x: torch.Tensor, s: Setting) -> torch.Tensor:
        c = x.shape[1]
        w, b = self.affine_at(s, c)
        if self.norm == "group":
            return F.group_norm(x, groups(c), w, b, self.eps)
        if s.calibrate is not None:
            if s.stats is None:
                raise ValueError("calibration needs Setting.stats, the grid row to write")
            with torch.no_grad():
                n = s.calibrate  # this is the (n+1)-th batch: cumulative mean over batches
                mean = x.mean(dim=(0, 2, 3))
                var = x.var(dim=(0, 2, 3), unbiased=True)
                self.running_mean[s.stats, :c].mul_(n / (n + 1)).add_(mean / (n + 1))
                self.running_var[s.stats, :c].mul_(n / (n + 1)).add_(var / (n + 1))
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        if s.stats is None:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean[s.stats, :c], self.running_var[s.stats, :c], w, b, False, 0.0, self.eps
        )

    def stats_at(self, s: Setting, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) used in eval at this setting."""
        if s.stats is None:
            raise ValueError("eval-mode statistics need Setting.stats")
        return self.running_mean[s.stats, :c], self.running_var[s.stats, :c]


def cos2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared cosine similarity of two flattened tensors (the LCS+L regulariser per layer)."""
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-8) ** 2

"""alpha -> an inference network that is *physically* compressed where the kind allows it.

| kind         | representation                                                               |
| ------------ | ---------------------------------------------------------------------------- |
| structured   | sliced convs (fewer channels, fewer FLOPs), BatchNorm folded, channels_last  |
| quantized 8  | int8 kernels: FX static quantisation (x86/fbgemm), calibrated on the          |
|              | checkpoint's sample images, per-channel weights                               |
| quantized <8 | simulated: fp32 convs holding the dequantised b-bit weights, fake-quantised  |
|              | activations as in training; stored size = packed b-bit codes (no CPU kernels  |
|              | for 3-7 bits exist in torch)                                                  |
| unstructured | dense masked weights (torch.sparse conv is slower than dense at these        |
|              | sizes, see the benchmark); stored size = CSR of the non-zeros where that  |
|              | is smaller than dense                                                         |

Every kind then runs as a frozen TorchScript module (traced, weights folded in as constants): the
whole forward runs in C++, so the inference thread takes the GIL once per call instead of once per op.
Measured: while another Python thread holds the GIL (the event loop parsing requests), an eager
batch-1 forward took 10-16 ms instead of 0.5; frozen, 1.5-2 ms. TorchScript is deprecated upstream in
favour of torch.compile/torch.export, whose CPU compile takes tens of seconds per alpha against the
tens of milliseconds a trace takes; if tracing fails, the module runs eagerly.

A `Compiled` model is frozen: eval mode, no gradients, never mutated after build, so the cache can
hand it to any thread.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lcs.alpha import Level
from lcs.checkpoint import CheckpointMeta
from lcs.layers import Setting, SubspaceConv2d
from lcs.models import SubspaceResNet

log = logging.getLogger("lcs.service")


@dataclass(frozen=True)
class Compiled:
    """One materialised alpha: call it on a normalised float batch [N, C, H, W] to get logits."""

    alpha: float
    level: Level
    module: nn.Module
    representation: str
    resident_bytes: int  # memory this model holds while cached
    stored_bytes: int  # size of the compressed representation (packed bits, CSR, or fp32 as is)
    build_seconds: float
    channels_last: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.module(x)


def _resident_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in module.modules():  # packed int8 weights live in opaque params of quantized modules
        packed = getattr(m, "_packed_params", None)
        if packed is not None:
            try:
                w = m.weight()  # type: ignore[operator]
                total += w.numel() * w.element_size() + 8 * (w.shape[0] if w.ndim else 1)
            except (AttributeError, RuntimeError, TypeError):
                pass
    return total


def _hidden_layers(model: SubspaceResNet) -> list[SubspaceConv2d]:
    return [m for m in model.modules() if isinstance(m, SubspaceConv2d) and m.role == "hidden"]


def _stored_bytes(model: SubspaceResNet, plain: nn.Module, s: Setting) -> int:
    """Bytes of the compressed representation: fp32 for dense parts, plus per kind for hidden layers."""
    total = sum(p.numel() * 4 for p in plain.parameters())
    level = s.level
    if level.kind == "structured":
        return total
    hidden = 0
    compressed = 0
    for conv in _hidden_layers(model):
        w = conv.weight_at(s, conv.c_in)
        hidden += w.numel() * 4
        if level.kind == "quantized":
            compressed += (w.numel() * level.bits + 7) // 8 + 8  # packed codes + scale, zero point
        else:
            nnz = int((w != 0).sum())
            csr = nnz * (4 + 4) + (w.shape[0] + 1) * 4  # CSR: values, column indices, row pointers
            compressed += min(csr, w.numel() * 4)  # whichever is smaller: CSR only pays below ~50 % density
    return max(0, total - hidden) + compressed


def _has_vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 into int32 directly (AVX512-VNNI / AVX-VNNI)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _int8(plain: nn.Module, samples: torch.Tensor) -> nn.Module:
    """FX graph-mode static int8 quantisation of a plain network, calibrated on `samples`.

    Activations: per-tensor affine over the observed min/max, as training's ActRange does. The full 8 bits
    are used where the CPU has VNNI; older x86 kernels add u8 x s8 pairs in int16, which can saturate,
    so there activations keep torch's default 7-bit range. Measured on quantized_line (10,000 test
    images): 98.66 % top-1 agreement with the training-side 8-bit model with the 7-bit range, 99.53 %
    with 8 bits (and faster). Weights: per-channel symmetric, a finer grid than training's per-tensor one.
    """
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    qconfig = QConfig(
        activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=not _has_vnni()),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(plain), QConfigMapping().set_global(qconfig), (samples[:2],))
        with torch.inference_mode():
            for i in range(0, len(samples), 64):
                prepared(samples[i : i + 64])
        return convert_fx(prepared)


def build(
    model: SubspaceResNet,
    meta: CheckpointMeta,
    alpha: float,
    *,
    samples: torch.Tensor | None,
    channels_last: bool,
    int8: bool = True,
) -> Compiled:
    """Materialise `alpha` of a loaded subspace model. `samples`: normalised float images for int8 calibration."""
    t0 = time.perf_counter()
    s = model.at(alpha)
    level = s.level
    if level.kind == "quantized" and level.bits == 8 and int8 and samples is not None:
        plain = model.export(Setting(s.alpha, level, s.stats, quantize_acts=False))
        module = _int8(plain, samples)
        representation, use_cl = "int8 (FX static quantisation, x86 kernels)", False
    else:
        plain = model.export(s)
        module = plain
        use_cl = channels_last
        if use_cl:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        representation = {
            "structured": f"sliced fp32, width {level.width:.3g}",
            "quantized": f"fp32 simulating {level.bits}-bit weights and activations",
            "unstructured": f"dense fp32 with {100 * (1 - level.keep):.1f} % of pruned-layer weights zero",
        }[level.kind]
    resident = _resident_bytes(module)  # before freezing turns the weights into graph constants
    shape = (2, meta.input.channels, meta.input.height, meta.input.width)
    module, how = freeze_module(module, torch.zeros(shape), use_cl)
    return Compiled(
        alpha=alpha,
        level=level,
        module=module,
        representation=f"{representation}, {how}",
        resident_bytes=resident,
        stored_bytes=_stored_bytes(model, plain, s),
        build_seconds=time.perf_counter() - t0,
        channels_last=use_cl,
    )


def freeze_module(module: nn.Module, example: torch.Tensor, channels_last: bool) -> tuple[nn.Module, str]:
    """(module traced and frozen by TorchScript, "TorchScript"), or (module, "eager") if that fails."""
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the deprecation notices, and the tracer's on constant shapes
            traced = torch.jit.trace(module.eval(), example, check_trace=False)
            return torch.jit.freeze(traced), "TorchScript"
    except Exception as e:  # a model the tracer cannot follow still serves, eagerly
        log.warning("TorchScript trace failed (%s: %s); running this model eagerly", type(e).__name__, e)
        return module, "eager"


def time_batch(compiled: Compiled, x: torch.Tensor, repeats: int = 5) -> float:
    """Median seconds for one forward of batch x (after one warm-up run)."""
    compiled(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled(x)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]

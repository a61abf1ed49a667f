"""alpha -> an inference network that is *physically* compressed where the kind allows it.

| kind         | representation                                                               |
| ------------ | ---------------------------------------------------------------------------- |
| structured   | sliced convs (fewer channels, fewer FLOPs), BatchNorm folded; channel counts |
|              | padded with zeros to multiples of 16 where that measures faster              |
| quantized 8  | int8 kernels: FX static quantisation (x86), calibrated on the checkpoint's    |
|              | sample images, per-channel weights; copies for batches of 1 and the largest   |
| quantized <8 | simulated: fp32 convs holding the dequantised b-bit weights, fake-quantised  |
|              | activations as in training; stored size = packed b-bit codes (no CPU kernels  |
|              | for 3-7 bits exist in torch)                                                  |
| unstructured | dense masked weights (torch.sparse conv is slower than dense at these        |
|              | sizes, see the benchmark); stored size = CSR of the non-zeros where that  |
|              | is smaller than dense                                                         |

Float networks then run on ONNX Runtime (the first network of each structure exported, ~40 ms; later
alphas, and padded copies, reuse its graph with their own weights in a few ms: `Graphs`): its CPU
kernels handle the narrow convolutions of low alphas far better than oneDNN does through torch, and a
call costs ~40 us over its kernels. Measured on structured_line, batch 32, 2 threads
(`benchmarks.alphas`, with and without `--backend torchscript`): alpha 1 in 2.80 ms and alpha 0 in 0.385
ms, against 4.50 and 0.955 ms as frozen TorchScript. The int8 network stays on torch's FX kernels (1.13
ms at batch 32; ORT's own int8 kernels took 1.7 ms in a one-off experiment when FX's took 1.35), as
frozen TorchScript, compiled for single images and full batches (`CopiesBySize`); so does everything if
`LCS_BACKEND=torchscript` or if the export fails (logged). Both run the whole forward in C++ and take
the GIL once per call, not once per op: with another Python thread holding the GIL (the event loop
parsing requests), an eager batch-1 forward took 10-16 ms instead of 0.5; frozen, 1.5-2 ms.

A `Compiled` model is frozen: eval mode, no gradients, never mutated after build, so the cache can
hand it to any thread.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import io
import logging
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
import psutil
import torch
from onnx import helper, numpy_helper
from torch import nn

from lcs.alpha import Level
from lcs.checkpoint import CheckpointMeta, InputSpec
from lcs.layers import Setting, SubspaceConv2d
from lcs.models import SubspaceResNet
from service.inputs import normaliser
from service.settings import BACKEND, MAX_BATCH, Backend

log = logging.getLogger("lcs.service")


@dataclass(frozen=True)
class Compiled:
    """One materialised alpha: call it on a normalised float batch [N, C, H, W] to get logits."""

    alpha: float
    level: Level
    module: Callable[[torch.Tensor], torch.Tensor]
    representation: str
    resident_bytes: int  # memory this model holds while cached (`build` says how it is counted)
    stored_bytes: int  # size of the compressed representation (packed bits, CSR, or fp32 as is)
    build_seconds: float
    channels_last: bool
    reclaimable: bool = True  # whether dropping it frees that memory: not for TorchScript (`build`)
    padded: bool = False  # runs with its channels padded to CHANNEL_MULTIPLE (`build`)
    rebuild_seconds: float | None = None  # building it again as `padded` says: build_seconds less the other
    # candidate's build and the timing that chose between them (None: as long as build_seconds)

    @property
    def on_onnx_runtime(self) -> bool:
        """Runs on ONNX Runtime's thread pool; else on torch's (int8, TorchScript, eager)."""
        return isinstance(self.module, OnnxModule)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.module, OnnxModule):  # no autograd to switch off: saves ~3 us a call
            return self.module(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.module(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits for a normalised float32 batch, numpy in and out: the serving path. On ONNX Runtime the
        batch goes straight to the session, so the call hands the GIL back once, for the run. Every torch
        op and every numpy op over 500 elements hands it back too, and while the event loop is busy each
        costs a wait of up to the switch interval to get it back: alpha 0 at 64 images took 2.6 ms through
        the torch path against 2.0 ms straight, beside a thread spinning in Python (one-off, 1 thread)."""
        if isinstance(self.module, OnnxModule):
            return self.module.logits(x)
        return self(torch.from_numpy(x)).numpy()


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


def release_freed_heap() -> None:
    """Hand the heap the process has freed back to the system (glibc's malloc_trim; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_growth_lock = threading.Lock()
_primed: set[str] = set()
R = TypeVar("R")


def _memory_growth(toolchain: str, build: Callable[[], R], prime: Callable[[], object]) -> tuple[R, int]:
    """`build()`, and how many bytes the process's resident memory grew across it, freed heap handed back
    before and after. Builds run on the service's one inference thread, so nothing else torch does is
    counted. The first build through a `toolchain` in a process also loads what every later one shares
    (the first int8 alpha of quantized_line grew the process by 142 MB, the next ones by 15), so `prime`,
    the same toolchain on a toy network, runs first, once per process; the first int8 alpha then counted
    22 MB (the kernels compiled for its shapes, which later alphas share)."""
    with _growth_lock:
        if toolchain not in _primed:
            prime()
            _primed.add(toolchain)
        release_freed_heap()
        before = psutil.Process().memory_info().rss
        built = build()
        release_freed_heap()
        return built, psutil.Process().memory_info().rss - before


class _Toy(nn.Module):
    """The smallest network with the layers ours have (convolution, BatchNorm, ReLU, residual add, pooling,
    classifier): what `_memory_growth` primes a toolchain with."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(channels, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.norm, self.head = nn.BatchNorm2d(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = self.conv(torch.relu(self.norm(y))) + y
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))  # type: ignore[no-any-return]


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


def normalised_samples(
    samples: tuple[torch.Tensor, torch.Tensor] | None, spec: InputSpec
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A checkpoint's sample images (`checkpoint.load_with_samples`) normalised as requests are (float32
    [N, C, H, W]), with their labels: what `build` calibrates int8 on. None if the checkpoint stores none, or
    none at all (an empty set calibrated int8 on nothing, and int8 served its guesses)."""
    if samples is None or not len(samples[0]):
        return None
    scale, shift = normaliser(spec)
    return torch.from_numpy(samples[0].numpy() * scale + shift), samples[1]


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
    so there activations keep torch's default 7-bit range. Measured on the 10-epoch quantized_line (10,000
    test images): 98.66 % top-1 agreement with the training-side 8-bit model with the 7-bit range, 99.53 %
    with 8 bits (and faster). Weights: per-channel symmetric, a finer grid than training's per-tensor one.
    Unlike training, which keeps them float, the stem conv, the classifier and the input are int8 too:
    keeping those two layers float served that model's alpha 1 at 90.76 % (its training-side
    accuracy) instead of 90.71, with 99.54 % agreement instead of 99.55, but ran 2.4x slower at batch 32
    (1.94 ms against 0.80) and 1.2x at batch 1 (2 threads, medians of 30 interleaved rounds, one-off).
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
    backend: Backend = BACKEND,
    max_batch: int = MAX_BATCH,
    pad: bool | None = None,
) -> Compiled:
    """Materialise `alpha` of a loaded subspace model. `samples`: normalised float images for int8 calibration.

    `backend` runs the float networks; `channels_last` is the layout TorchScript runs them in (ONNX Runtime
    picks its own). A float network whose channel counts are not multiples of CHANNEL_MULTIPLE is also
    built padded to them, and runs padded if that computes the same logits and is faster at `max_batch`
    images, the largest batch the service runs (on ONNX Runtime only: see below). That is `pad=None`;
    `pad=True` builds the padded network alone and `pad=False` the plain one, without timing either: a
    rebuild repeats what the first build measured (`Runtime._build`): structured_line's alphas tried
    padded took 107-205 ms to build first and 46-56 ms again (1 thread, medians of 3 rebuilds; 10-34 ms
    once graphs were reused: `Graphs`).
    The int8 network is compiled for batches of 1 and of `max_batch` (`CopiesBySize`).

    `resident_bytes`, what the cache's bound counts: for a network on ONNX Runtime, its graph bytes plus
    ONNX Runtime's copy of the weights and ONNX_SESSION_BYTES (`benchmarks.memory`, the growth of the
    process's resident memory per model kept, against this count: structured_line alpha 1 2.77 MB held
    against 2.76 counted, alpha 0 0.30 against 0.46, quantized_line's 6-bit alpha 3.04 against 2.78). A
    network torch compiles (int8, TorchScript, or eager after a failed trace) is counted as the measured
    growth across its build (`_memory_growth`) and is not `reclaimable`: the TorchScript tracer keeps what
    it traced for the life of the process (pytorch/pytorch#35600), so dropping such a network frees
    nothing and building it again holds as much again. Measured (build, run, drop, eight times over):
    quantized_line's int8 alpha grew the process by 15 MB a build, for 0.63 MB of weights, and freed none
    of it; structured_line's alpha 1 on ONNX Runtime by 0.2 MB in all. The cache keeps such models rather
    than evict them (`ModelCache`), and channel padding is tried on ONNX Runtime only, where it pays, so
    no discarded candidate is traced."""
    t0 = time.perf_counter()
    first_only = 0.0  # seconds of this build that building the alpha again skips (the padding decision)
    s = model.at(alpha)
    level = s.level
    shape = (2, meta.input.channels, meta.input.height, meta.input.width)
    if level.kind == "quantized" and level.bits == 8 and int8 and samples is not None:
        plain = model.export(Setting(s.alpha, level, s.stats, quantize_acts=False))
        calibration = samples  # narrowed, for the closures

        def int8_copies(net: nn.Module, images: torch.Tensor) -> tuple[nn.Module, Callable[..., torch.Tensor], str]:
            quantised = _int8(net, images)
            return quantised, *CopiesBySize.compile(quantised, torch.zeros(shape), max_batch)

        (module, runner, how), grown = _memory_growth(
            "int8", lambda: int8_copies(plain, calibration), lambda: int8_copies(_Toy(shape[1]), torch.randn(shape))
        )
        use_cl, reclaimable, padded = False, False, False
        sizes = sorted(runner.networks) if isinstance(runner, CopiesBySize) else []
        compiled_for = f", compiled for batches of {' and '.join(map(str, sizes))}" if sizes else ""
        representation = f"int8 (FX static quantisation, x86 kernels{compiled_for})"
        resident = max(grown, _resident_bytes(module) * max(1, len(sizes)))
    else:
        plain = model.export(s)
        use_cl = channels_last and backend == "torchscript"
        representation = {
            "structured": f"sliced fp32, width {level.width:.3g}",
            "quantized": f"fp32 simulating {level.bits}-bit weights and activations",
            "unstructured": f"dense fp32 with {100 * (1 - level.keep):.1f} % of pruned-layer weights zero",
        }[level.kind]
        wide = pad_channels(plain, CHANNEL_MULTIPLE) if pad is not False and backend == "onnxruntime" else None
        candidates: list[nn.Module] = [plain] if wide is None else [wide] if pad else [plain, wide]
        padded = pad is True and wide is not None
        built, took = [], []
        for net in candidates:
            t = time.perf_counter()
            built.append(
                compile_module(
                    net.to(memory_format=torch.channels_last) if use_cl else net,  # type: ignore[call-overload]
                    torch.zeros(shape),
                    backend=backend,
                    channels_last=use_cl,
                )
            )
            took.append(time.perf_counter() - t)
        runner, how, resident, reclaimable = built[0]
        if len(built) == 2:
            t = time.perf_counter()
            padded = _padding_pays(built[0].run, built[1].run, meta, max_batch, use_cl)
            chosen = int(padded)
            runner, how, resident, reclaimable = built[chosen]
            first_only = took[1 - chosen] + time.perf_counter() - t
        if padded:
            representation += f", channels padded to multiples of {CHANNEL_MULTIPLE}"
    seconds = time.perf_counter() - t0
    return Compiled(
        alpha=alpha,
        level=level,
        module=runner,
        representation=f"{representation}, {how}",
        resident_bytes=resident,
        stored_bytes=_stored_bytes(model, plain, s),
        build_seconds=seconds,
        rebuild_seconds=seconds - first_only,
        channels_last=use_cl,
        reclaimable=reclaimable,
        padded=padded,
    )


CHANNEL_MULTIPLE = 16
"""Channel counts that vectorised CPU kernels handle without a slow remainder path: ONNX Runtime's
convolutions work on blocks of 16 channels with AVX-512 (8 with AVX2). Measured on structured_line (2
threads, batch 32, a one-off run in interleaved rounds): alpha 0.85 (widths 28/57/114) ran in 5.95 ms
sliced and 2.79 padded to 32/64/128, alpha 1's widths, where alpha 1 takes 2.78; alpha 0 (8/16/32) ran
faster unpadded, 0.385 ms against 0.483. Under TorchScript no width ran faster padded."""


def pad_channels(net: nn.Module, multiple: int) -> nn.Module | None:
    """A copy of a plain network with every hidden channel count rounded up to `multiple`; None if none
    needs it, or if `net` has grouped convolutions (whose channels cannot be padded independently) or
    GroupNorm (whose groups depend on the channel count: padded, the copy did not run, and every alpha of
    a GroupNorm checkpoint but 1 failed to build on ONNX Runtime).

    The added channels have zero weights, biases and BatchNorm scales, so they stay zero through every
    layer and the logits do not change. The first convolution's input (the image) is not padded; every
    other convolution, BatchNorm and Linear input is assumed to carry hidden channels, which `build`
    checks by comparing logits."""
    layers = [m for m in net.modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d | nn.Linear)]
    convs = [m for m in layers if isinstance(m, nn.Conv2d)]
    if not convs or any(c.groups != 1 for c in convs) or any(isinstance(m, nn.GroupNorm) for m in net.modules()):
        return None

    def up(c: int) -> int:
        return -(-c // multiple) * multiple

    counts = [c.out_channels for c in convs] + [c.in_channels for c in convs[1:]]
    counts += [m.num_features for m in layers if isinstance(m, nn.BatchNorm2d)]
    counts += [m.in_features for m in layers if isinstance(m, nn.Linear)]
    if all(c == up(c) for c in counts):
        return None

    def grown(t: torch.Tensor, shape: tuple[int, ...], fill: float = 0.0) -> torch.Tensor:
        out = torch.full(shape, fill, dtype=t.dtype)
        out[tuple(slice(0, n) for n in t.shape)] = t
        return out

    net = copy.deepcopy(net)
    stem = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = up(m.out_channels), m.in_channels if m is stem else up(m.in_channels)
            m.weight = nn.Parameter(grown(m.weight.data, (m.out_channels, m.in_channels, *m.kernel_size)), False)
            if m.bias is not None:
                m.bias = nn.Parameter(grown(m.bias.data, (m.out_channels,)), False)
        elif isinstance(m, nn.BatchNorm2d):
            m.num_features = n = up(m.num_features)
            if m.weight is not None and m.bias is not None:
                m.weight = nn.Parameter(grown(m.weight.data, (n,)), False)
                m.bias = nn.Parameter(grown(m.bias.data, (n,)), False)
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean, m.running_var = grown(m.running_mean, (n,)), grown(m.running_var, (n,), 1.0)
        elif isinstance(m, nn.Linear):
            m.in_features = up(m.in_features)
            m.weight = nn.Parameter(grown(m.weight.data, (m.out_features, m.in_features)), False)
    return net


def _padding_pays(
    plain: Callable[[torch.Tensor], torch.Tensor],
    padded: Callable[[torch.Tensor], torch.Tensor],
    meta: CheckpointMeta,
    batch: int,
    channels_last: bool,
) -> bool:
    """Whether the padded network gives the plain one's logits and runs at least 5 % faster on `batch`
    images (the median of 3 interleaved rounds: ~0.1 s for this repository's models)."""
    x = torch.randn(batch, meta.input.channels, meta.input.height, meta.input.width)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if not torch.allclose(plain(x), padded(x), rtol=1e-4, atol=1e-4):
            log.warning("padding the channels changed this network's logits; running it unpadded")
            return False
        t = time_in_rounds({"plain": functools.partial(plain, x), "padded": functools.partial(padded, x)}, 3)
    return t["padded"] < 0.95 * t["plain"]


class OnnxModule:
    """A network exported to ONNX and run by ONNX Runtime's CPU kernels: float batch in, float output out.

    Every session shares one process-wide thread pool (`onnx_threads`). `InferenceSession.run` releases
    the GIL while it computes.
    """

    def __init__(self, model_bytes: bytes) -> None:
        self.model_bytes = model_bytes  # the graph it runs (the session keeps this same object too)
        onnx_threads()
        self.session = ort.InferenceSession(model_bytes, self.session_options(), providers=["CPUExecutionProvider"])

    @staticmethod
    def session_options() -> ort.SessionOptions:
        """How the service's sessions are configured (`benchmarks.ops` profiles in one configured so)."""
        opts = ort.SessionOptions()
        opts.use_per_session_threads = False  # the process-wide pool, `onnx_threads`
        opts.log_severity_level = 3  # errors only; it warns about unused initialisers
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # as torch.set_flush_denormal does
        # no per-session arena: each would keep its largest batch's buffers for every cached alpha: the service
        # sat at 770 MiB with it, 384 without, when the self-check ran 256 images at once (432 as TorchScript);
        # 454 against 376 with the self-check in batches of LCS_MAX_BATCH
        opts.enable_cpu_mem_arena = False
        return opts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.logits(x.detach().float().contiguous().numpy()))

    def logits(self, x: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(["y"], {"x": np.ascontiguousarray(x, dtype=np.float32)})
        return out  # type: ignore[no-any-return]


_pool_threads: int | None = None
_pool_lock = threading.Lock()


def onnx_threads() -> int:
    """The size of ONNX Runtime's one thread pool: torch's intra-op thread count (which the service sets from
    LCS_THREADS) when the first session is made, fixed for the process after that.

    One pool for all alphas, not one per session: a session's idle workers spin for a while after each
    run, and the next batch runs in another alpha's session. Measured at 2 threads, batch 32, alphas
    0..1 alternating (one-off experiments): per-session pools that spin took 12-22 ms at alphas 0.5-1;
    ones that do not spin wake their workers per op, alpha 0 in 0.7-1.1 ms; one shared pool ran alpha 1
    in 2.9 ms and alpha 0 in 0.46. Once the shared pool exists, ORT refuses sessions with pools of their
    own in this process.
    """
    global _pool_threads
    with _pool_lock:
        if _pool_threads is None:
            ort.set_global_thread_pool_sizes(torch.get_num_threads(), 1)
            _pool_threads = torch.get_num_threads()
        elif _pool_threads != torch.get_num_threads():
            log.warning(
                "ONNX Runtime's thread pool has %d threads for this process; torch now has %d",
                _pool_threads,
                torch.get_num_threads(),
            )
        return _pool_threads


def export_onnx(module: nn.Module, example: torch.Tensor) -> bytes:
    """`module` as an ONNX graph with one input "x" and a free batch dimension."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(
            module.eval(),
            (example,),
            buf,  # type: ignore[arg-type]  # the TorchScript-based exporter writes to file objects too
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
            dynamo=False,  # the TorchScript-based exporter: ~40 ms, needs only the onnx package
        )
    return buf.getvalue()


class Graphs:
    """ONNX graphs reused across alphas. Every alpha of a kind exports to the same graph, nodes and names
    alike (the module's parameter names), with only its initializers' values and shapes differing: the
    torch exporter's trace took 75-85 % of a rebuild (62-66 ms of 73-87 on `structured_line`, one-off). So the
    first network of each structure (its submodules' names and types) is traced, and the next ones get
    that graph with their own weights put in by name, in a few milliseconds. A structure whose graph
    holds anything but the module's own weights (a constant the exporter computed, a renamed weight) is
    never reused. Every reused graph's logits are checked against its module's (`_checked`); where they
    differ, the module is traced, and so is every later one of its structure."""

    def __init__(self) -> None:
        self._skeletons: dict[Hashable, onnx.ModelProto | None] = {}  # None: traced every time
        self._lock = threading.Lock()

    @staticmethod
    def _key(module: nn.Module) -> Hashable:
        return tuple((name, type(m).__qualname__) for name, m in module.named_modules())

    def bytes(self, module: nn.Module, example: torch.Tensor) -> tuple[bytes, bool]:
        """`module` as ONNX: (graph bytes, whether they were reused rather than traced)."""
        key = self._key(module)
        with self._lock:
            skeleton = self._skeletons.get(key)
        weights = {k: v.detach() for k, v in module.state_dict().items()}
        if skeleton is not None and any(t.name not in weights for t in skeleton.graph.initializer):
            skeleton = None  # the same submodules with other weights (a bias only one of them has)
        if skeleton is None:
            traced = export_onnx(module, example)
            with self._lock:
                if key not in self._skeletons:
                    self._skeletons[key] = self._skeleton(onnx.load_from_string(traced), weights)
            return traced, False
        model = onnx.ModelProto()
        model.CopyFrom(skeleton)
        del model.graph.initializer[:]
        model.graph.initializer.extend(
            numpy_helper.from_array(weights[t.name].numpy(), t.name) for t in skeleton.graph.initializer
        )
        return model.SerializeToString(), True

    def forget(self, module: nn.Module) -> None:
        """Trace every network of `module`'s structure from now on."""
        with self._lock:
            self._skeletons[self._key(module)] = None

    @staticmethod
    def _skeleton(model: onnx.ModelProto, weights: Mapping[str, torch.Tensor]) -> onnx.ModelProto | None:
        """The graph with its initializers emptied (names, in order, kept) and no inferred shapes; None if an
        initializer is not one of the module's weights as they are, or if the graph holds constants (values
        the trace computed, which may differ by alpha: the quantized kind's scales and bounds per bit width)."""
        if any(node.op_type == "Constant" for node in model.graph.node):
            return None
        for t in model.graph.initializer:
            w = weights.get(t.name)
            if (
                w is None
                or tuple(t.dims) != tuple(w.shape)
                or t.data_type != helper.np_dtype_to_tensor_dtype(w.numpy().dtype)
            ):
                return None
        for t in model.graph.initializer:
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("int64_data")
            t.ClearField("dims")
        del model.graph.value_info[:]  # the traced network's channel counts: ONNX Runtime infers them again
        return model


GRAPHS = Graphs()


ONNX_SESSION_BYTES = 300_000
"""What an ONNX Runtime session holds beyond its graph and weights once it has run (kernel state,
prepacked weights net of the initialisers it drops): 0.14-0.56 MB per model on the shipped networks,
0.24-0.32 on most (`benchmarks.memory`'s committed runs: held, less graph and weights)."""


class Network(NamedTuple):
    """A compiled float network and what it holds (`build` says how that is counted)."""

    run: Callable[[torch.Tensor], torch.Tensor]
    how: str  # what runs it: "ONNX Runtime", "TorchScript" or "eager"
    resident_bytes: int
    reclaimable: bool


def compile_module(module: nn.Module, example: torch.Tensor, *, backend: Backend, channels_last: bool) -> Network:
    """`module` on ONNX Runtime or as frozen TorchScript, as `backend` says. ONNX Runtime falls back to
    TorchScript, TorchScript to eager, each fallback logged."""
    if backend == "onnxruntime":
        try:
            graph, reused = GRAPHS.bytes(module, example)
            session = _checked(module, graph, example) if reused else OnnxModule(graph)
            if session is None:
                session = OnnxModule(export_onnx(module, example))
            held = len(session.model_bytes) + _resident_bytes(module) + ONNX_SESSION_BYTES
            return Network(session, "ONNX Runtime", held, True)
        except Exception as e:
            log.warning(
                "ONNX export or session failed (%s: %s); running this model as TorchScript", type(e).__name__, e
            )

    def toy() -> object:
        return freeze_module(_Toy(example.shape[1]).eval(), torch.zeros(2, *example.shape[1:]), channels_last)

    (run, how), grown = _memory_growth("torchscript", lambda: freeze_module(module, example, channels_last), toy)
    return Network(run, how, max(grown, _resident_bytes(module)), False)


def _checked(module: nn.Module, graph: bytes, example: torch.Tensor) -> OnnxModule | None:
    """A session of a reused graph (`Graphs`) if it computes the module's logits on random images shaped
    like `example`; else None, and that structure's graphs are traced from then on."""
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
    try:
        session = OnnxModule(graph)
        with torch.inference_mode():
            if torch.allclose(session(x), module.eval()(x), rtol=1e-4, atol=1e-4):
                return session
        why = "gave other logits than its network"
    except Exception as e:
        why = f"failed ({type(e).__name__}: {e})"
    log.warning("an ONNX graph reused for another alpha %s; exporting each such network instead", why)
    GRAPHS.forget(module)
    return None


class CopiesBySize:
    """An int8 network frozen twice, for batches of one image and of `largest`, each copy first run at its
    size; other sizes run on the `largest` copy, and larger batches in chunks of `largest`.

    Why: torch's oneDNN int8 convolution keeps, per packed weight, the compiled primitive of the first
    input shape it runs, and builds one afresh (looked up in oneDNN's cache) on every call of any other
    shape: about 0.22 ms a forward here. Measured on quantized_line at 2 threads (one-off, interleaved
    rounds), on a copy first run at the batch's own size against one first run at another: batch 1 0.18
    ms against 0.40, batch 8 0.39 against 0.61, batch 32 1.08 against 1.32. A copy per size would serve
    every size fast, but each frozen copy holds 5.5 MB (measured after malloc_trim: 16 copies, 88 MB), so
    only the two sizes that matter most get one: single images at low load, full batches at saturation."""

    def __init__(self, networks: dict[int, torch.jit.ScriptModule]) -> None:
        self.networks = networks  # batch size -> the copy compiled for it
        self.largest = max(networks)

    @classmethod
    def compile(
        cls, module: nn.Module, example: torch.Tensor, largest: int
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
        """(runner, how it runs): a CopiesBySize, or `module` itself, eager, if the tracer cannot follow it."""
        sizes = sorted({1, largest})
        copies = _frozen_copies(module, example, len(sizes))  # traced once, each freeze: weights of its own
        if copies is None:
            return module, "eager"
        networks = dict(zip(sizes, copies, strict=True))
        with torch.inference_mode():
            for n, network in networks.items():
                network(torch.zeros(n, *example.shape[1:]))  # the shape its convolutions keep compiled
        return cls(networks), "TorchScript"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.largest:
            return torch.cat([self(chunk) for chunk in x.split(self.largest)])
        return self.networks.get(len(x), self.networks[self.largest])(x)  # type: ignore[no-any-return]


def freeze_module(module: nn.Module, example: torch.Tensor, channels_last: bool) -> tuple[nn.Module, str]:
    """(module traced and frozen by TorchScript, "TorchScript"), or (module, "eager") if that fails."""
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    copies = _frozen_copies(module, example, 1)
    return (module, "eager") if copies is None else (copies[0], "TorchScript")


def _frozen_copies(module: nn.Module, example: torch.Tensor, count: int) -> list[torch.jit.ScriptModule] | None:
    """`module` traced once and frozen `count` times, or None (logged) if that fails: a model the tracer
    cannot follow still serves, eagerly."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the deprecation notices, and the tracer's on constant shapes
            traced = torch.jit.trace(module.eval(), example, check_trace=False)
            return [torch.jit.freeze(traced) for _ in range(count)]
    except Exception as e:
        log.warning("TorchScript trace failed (%s: %s); running this model eagerly", type(e).__name__, e)
        return None


K = TypeVar("K")


def time_in_rounds(
    calls: Mapping[K, Callable[[], object]],
    rounds: int,
    *,
    group: Callable[[K], Hashable] | None = None,
    each_round: Callable[[], None] | None = None,
) -> dict[K, float]:
    """Median seconds of each call over `rounds` rounds, each running every call twice and timing the
    second. The rounds let all calls see the same machine (its pace drifts by up to 2x over minutes
    here); the untimed run pays for switching from the previous call (another alpha, size or runtime,
    which is `benchmarks.switching`'s to measure) and, on a first call, for creating a shape's kernels.

    `group`: calls in different groups get rounds of their own, one group after another. For the thread
    pools: with 2 threads or more, ONNX Runtime's and torch's idle workers spin for a while after a call
    and slow the other runtime's next one, even after the untimed run (quantized_line at batch 32 and 2
    threads, `benchmarks.alphas`: the float network 7.67 ms and int8 1.61 in shared rounds, 2.87 and 1.35
    apart). A service serves one alpha at a time, so apart is its steady state.

    `each_round`: called before each round (the warm-up's, to stop when the service shuts down)."""
    if group is not None:
        out: dict[K, float] = {}
        for g in dict.fromkeys(map(group, calls)):
            out |= time_in_rounds({k: c for k, c in calls.items() if group(k) == g}, rounds, each_round=each_round)
        return out
    times: dict[K, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        if each_round is not None:
            each_round()
        for k, call in calls.items():
            call()
            t0 = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(ts) for k, ts in times.items()}

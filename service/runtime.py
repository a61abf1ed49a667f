"""The service core without HTTP: checkpoint, materialised-model cache, latency profile, controller.

`Runtime.load` validates everything a request will need; `Runtime.warm_up` builds the prebuilt
alphas and measures the latency profile (readiness turns true only after it).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from lcs import checkpoint
from lcs.alpha import LEVEL_NAMES, spelled
from lcs.checkpoint import CheckpointError, CheckpointMeta
from lcs.models import SubspaceResNet
from service.cache import Grid, ModelCache
from service.cgroups import usable_cpus
from service.controller import Controller
from service.inputs import normaliser
from service.materialize import Compiled, build, normalised_samples, release_freed_heap, time_in_rounds
from service.profile import LatencyProfile
from service.settings import Settings

log = logging.getLogger("lcs.service")


def softmax(logits: np.ndarray) -> np.ndarray:
    """A batch's probabilities from its logits, on the event loop (see `Runtime.logits`), once per batch
    rather than per request: 4.6 us for a batch of one image, 5.6 for 16. A NaN logit (or +inf) gives a row
    of NaN, which each request's answer checks for its own rows (`service.app._infer`); -inf gives 0."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]


def inference_executor() -> ThreadPoolExecutor:
    """The one thread that does the service's torch work: loading, building, profiling, every batch.

    torch's OpenMP runtime keeps a pool of worker threads per thread that starts parallel work, and once
    the process's pools hold more threads than there are CPUs, idle workers stop spinning between
    parallel regions and sleep, so every torch op wakes them again. A single parallel torch op on the
    event loop (normalising a 64-image request, loading the checkpoint) gave it a pool of its own, and
    from then on the int8 network ran at half speed on the inference thread (one-off, batch 32, 2
    threads: 2.10 ms against 1.13-1.20; TorchScript alpha 1 8.9 against 6.4). So the event loop works in
    numpy (`service.inputs`) and everything torch runs here. ONNX Runtime has a pool of its own; the one
    torch pool, spinning for a while after each parallel op, slows an ONNX Runtime batch run right
    after one, which is why the softmax is numpy's (a quantized model's int8 batches still slow a
    3-7-bit batch that follows them)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lcs-infer")


def _listed(alphas: Sequence[float]) -> str:
    """Alphas as an LCS_ list variable spells them ("0,0.33,1"), for an error naming the value."""
    return ",".join(f"{a:g}" for a in alphas)


PROFILE_ROUNDS = 7  # timings per (alpha, batch size) in the start-up profile, one per round


class WarmUpStopped(Exception):
    """The service is shutting down: the warm-up stopped between two of its steps."""


@dataclass
class Runtime:
    settings: Settings
    model: SubspaceResNet
    meta: CheckpointMeta
    name: str
    grid: Grid
    samples: torch.Tensor | None  # normalised sample images from the checkpoint, [N, C, H, W]
    sample_labels: torch.Tensor | None
    scale: np.ndarray  # float32 [1, C, 1, 1]: normalised = raw * scale + shift
    shift: np.ndarray
    cache: ModelCache = field(init=False)
    profile: LatencyProfile = field(default_factory=LatencyProfile)
    controller: Controller = field(init=False)
    channels_last: bool = False
    accuracy: dict[float, float] = field(default_factory=dict)
    self_check: dict[str, float] = field(default_factory=dict)
    prebuild: list[float] = field(default_factory=list)  # grid alphas built and profiled at start-up
    padded: dict[float, bool] = field(default_factory=dict)  # grid alpha -> whether its first build ran padded
    ready: bool = False
    # set on shutdown: the warm-up stops at its next step (a build, a profile round, an alpha's self-check),
    # where it ran to its end, seconds after the server had stopped (as a container's PID 1: 8.6 s)
    stopping: threading.Event = field(default_factory=threading.Event)
    loaded_at: float = field(default_factory=time.time)  # wall clock, for /model

    @classmethod
    def load(cls, settings: Settings) -> Runtime:
        """Load and validate the checkpoint and settings together; raises CheckpointError/ValueError."""
        torch.set_num_threads(settings.threads)
        torch.set_flush_denormal(True)  # denormals made fake-quantised layers 100x slower here
        # TorchScript models (int8, LCS_BACKEND=torchscript): oneDNN caches one primitive per conv shape;
        # every grid alpha at every batch size is a shape of its own, and the default 1,024 entries thrash:
        # serving random (alpha, batch) pairs cost 276.9 us per image against 142.9 at one alpha, and 160.4
        # with this cache (benchmarks.switching). Read when the first conv runs.
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")
        model, meta, stored = checkpoint.load_with_samples(settings.checkpoint, named_by="LCS_CHECKPOINT")
        # each grid alpha as the checkpoint spells it (0.50000001 -> 0.5), so that the accuracy it records is found
        named = [*model.stat_alphas, *(p.alpha for p in meta.accuracy)]
        asked = settings.alpha_grid or model.stat_alphas
        grid_alphas = [a if (n := spelled(a, named)) is None else n for a in asked]
        if meta.norm == "batch":  # its accuracy alphas are among stat_alphas (CheckpointMeta checks)
            missing = [a for a in grid_alphas if a not in model.stat_alphas]
            if missing:
                raise ValueError(
                    f"LCS_ALPHA_GRID={_listed(asked)}: alphas {missing} have no BatchNorm statistics in "
                    f"{settings.checkpoint}; "
                    f"choose from {list(model.stat_alphas)}"
                )
        grid = Grid(grid_alphas)
        # prebuilt alphas are grid alphas, as the grid spells them (one off the grid was once snapped down
        # without a word: LCS_PREBUILD=0.33 built 0.3)
        prebuild = {a: spelled(a, grid.alphas) for a in settings.prebuild or grid.alphas}
        if off := [a for a, on in prebuild.items() if on is None]:
            served = "LCS_ALPHA_GRID" if settings.alpha_grid else f"the grid of {settings.checkpoint}"
            raise ValueError(
                f"LCS_PREBUILD={_listed(settings.prebuild or [])}: alphas {off} are not on the served grid "
                f"[{', '.join(f'{a:g}' for a in grid.alphas)}] "
                f"({served}); choose prebuilt alphas from it, or unset LCS_PREBUILD to build the whole grid"
            )
        scale, shift = normaliser(meta.input)
        samples = normalised_samples(stored, meta.input)
        rt = cls(
            settings=settings,
            model=model,
            meta=meta,
            name=settings.model_name or settings.checkpoint.stem,
            grid=grid,
            samples=None if samples is None else samples[0],
            sample_labels=None if samples is None else samples[1],
            scale=scale,
            shift=shift,
        )
        # and always the top of the grid: the controller raises the ceiling only to profiled alphas, so without
        # it an idle service lowered the ceiling to the highest prebuilt alpha and never raised it again
        rt.prebuild = sorted({a for a in prebuild.values() if a is not None} | {grid.alphas[-1]}, reverse=True)
        # keyed as the grid spells each alpha (a table may spell one within SAME_ALPHA of stat_alphas)
        rt.accuracy = {}
        for p in meta.accuracy:
            on_grid = spelled(p.alpha, grid.alphas)
            rt.accuracy[p.alpha if on_grid is None else on_grid] = p.accuracy
        rt.cache = ModelCache(rt._build, grid, settings.cache_bytes)
        rt.controller = Controller(
            grid,
            rt.profile,
            slo_seconds=settings.slo_p99_seconds,
            max_batch=settings.max_batch,
            battery_low_percent=settings.battery_low_percent,
            battery_alpha_cap=settings.battery_alpha_cap,
            policy=settings.policy,
            overlap=settings.threads < usable_cpus(),
        )
        return rt

    def _build(self, alpha: float) -> Compiled:
        """The cache's builder. An alpha built again (dropped under memory pressure, or evicted) runs padded
        or not as its first build measured: without building and timing both again, which took most of its
        time, and the same network the start-up profile timed."""
        compiled = build(
            self.model,
            self.meta,
            alpha,
            samples=self.samples,
            channels_last=self.channels_last,
            backend=self.settings.backend,
            max_batch=self.settings.max_batch,
            pad=self.padded.get(alpha),
        )
        self.padded[alpha] = compiled.padded
        return compiled

    def warm_up(self) -> None:
        """Pick the memory layout, prebuild alphas, profile latency per (alpha, batch), self-check accuracy."""
        s = self.settings
        shape = (self.meta.input.channels, self.meta.input.height, self.meta.input.width)
        probe = torch.randn(max(s.profile_batches), *shape)
        if s.channels_last == "auto" and s.backend == "torchscript":
            # probe on the fp32 network (int8=False): the int8 path ignores the layout, and calibrating
            # it twice here would only repeat work the cache does next
            top = self.grid.alphas[-1]
            nets = {
                cl: build(self.model, self.meta, top, samples=None, channels_last=cl, int8=False, backend="torchscript")
                for cl in (True, False)
            }
            t = time_in_rounds({cl: functools.partial(net, probe) for cl, net in nets.items()}, 5)
            t_cl, t_nc = t[True], t[False]
            self.channels_last = t_cl < t_nc
            log.info(
                "memory layout: channels_last=%s (%.2f ms vs %.2f ms at batch %d)",
                self.channels_last,
                t_cl * 1e3,
                t_nc * 1e3,
                len(probe),
            )
        else:  # "auto" under ONNX Runtime: only a TorchScript fallback would use it
            self.channels_last = s.channels_last == "on"
        # held here until both are done, whatever the cache's bound evicts: profiled and self-checked as built
        built = {}
        for alpha in self.prebuild:
            self._go_on()
            built[alpha] = self.cache.get(alpha, counted=False)
        self._measure_profile(built, probe)
        self._self_check(built)
        del built  # those the bound evicted are freed before the heap is trimmed, below
        # the fastest model is kept, whatever the bound or memory pressure: a load rise falls back on it, and
        # building it then would make late batches later (with a small LCS_CACHE_BYTES, prebuilding the grid
        # may have evicted it: built again here)
        fastest = self.controller.fastest()
        self.cache.keep = frozenset({fastest})
        self.cache.get(fastest, counted=False)
        if self.cache.bytes > s.cache_bytes:
            log.warning(
                "the %d models cached after start-up hold %.1f MiB, over LCS_CACHE_BYTES (%.1f MiB): the cache "
                "keeps the newest model, the fastest and those it cannot free (int8 and TorchScript networks, "
                "see service.cache); raise LCS_CACHE_BYTES, or prebuild fewer alphas (LCS_PREBUILD)",
                len(self.cache),
                self.cache.bytes / 2**20,
                s.cache_bytes / 2**20,
            )
        # building, profiling and checking every alpha fragment the heap: measured after warm-up, 404-434 MiB
        # resident before handing the freed part back, 346 after
        release_freed_heap()
        self.ready = True

    def _go_on(self) -> None:
        if self.stopping.is_set():
            log.info("warm-up stopped: the service is shutting down")
            raise WarmUpStopped

    def _self_check(self, built: dict[float, Compiled]) -> None:
        """Each model's accuracy on the checkpoint's sample images (`self_check`), verified against the test
        accuracy it records. A checkpoint may carry no sample images, or none at all (lcs.checkpoint accepts
        0): nothing to check."""
        if self.samples is None or self.sample_labels is None or not len(self.samples):
            return
        x, step = self.samples.numpy(), self.settings.max_batch
        finite = {}
        for alpha, compiled in built.items():
            self._go_on()
            # in the batches the service runs: all the sample images at once made start-up's peak
            logits = np.concatenate([compiled.logits(x[i : i + step]) for i in range(0, len(x), step)])
            finite[alpha] = bool(np.isfinite(logits).all())
            pred = logits.argmax(1)
            self.self_check[f"{alpha:g}"] = round(100.0 * float((pred == self.sample_labels.numpy()).mean()), 2)
        self._verify_self_check(list(built), finite)

    def _verify_self_check(self, alphas: list[float], finite: dict[float, bool]) -> None:
        """Raise CheckpointError if the model at some alpha gives NaN or Inf on its own sample images (every
        answer there would be a 500), or is far worse on them than the checkpoint says it is on the test set:
        weights or statistics corrupted in a way loading cannot see (safetensors keeps no checksum). A
        bit-flipped conv weight gave 5-12 % where 89.7-91.9 was recorded."""
        broken = [f"{a:g}" for a in sorted(alphas) if not finite[a]]
        if broken:
            raise CheckpointError(
                f"{self.settings.checkpoint}: start-up self-check failed: the model gives NaN or Inf outputs on its "
                f"sample images at alpha {', '.join(broken[:4])}{', ...' if len(broken) > 4 else ''}; "
                "its weights or statistics are corrupt (overflowing). Restore or retrain the checkpoint."
            )
        margin = self.settings.self_check_margin
        low = [
            (a, self.self_check[f"{a:g}"], self.accuracy[a])
            for a in alphas
            if a in self.accuracy and self.self_check[f"{a:g}"] < self.accuracy[a] - margin
        ]
        if low:
            assert self.samples is not None
            worst = ", ".join(f"alpha {a:g}: {got:.1f} % against {want:.1f} %" for a, got, want in low[:4])
            raise CheckpointError(
                f"{self.settings.checkpoint}: start-up self-check failed: on its {len(self.samples)} sample images "
                f"the model scores more than {margin:g} points (LCS_SELF_CHECK_MARGIN) below the test accuracy "
                f"it records ({worst}{', ...' if len(low) > 4 else ''}); its weights or statistics are corrupt. "
                "Restore or retrain the checkpoint."
            )

    def _measure_profile(self, built: dict[float, Compiled], probe: torch.Tensor) -> None:
        """Seconds per batch at each (alpha, profiled batch size) in the steady state of repeated calls: the
        median of PROFILE_ROUNDS rounds, each timing every pair once (`time_in_rounds`). Timed one alpha
        after another instead, a minute's drift in the machine's pace (up to 2x here) made alpha 1 look
        slower than alphas 0.65-0.85, which (unpadded, their widths off ONNX Runtime's 16-channel blocks)
        were slower."""
        batches = self.settings.profile_batches
        calls = {(a, b): functools.partial(c.logits, probe[:b].numpy()) for a, c in built.items() for b in batches}
        by_runtime = time_in_rounds(
            calls, PROFILE_ROUNDS, group=lambda k: built[k[0]].on_onnx_runtime, each_round=self._go_on
        )
        for (alpha, b), seconds in by_runtime.items():
            self.profile.add(alpha, b, seconds)

    def logits(self, alpha: float, x: np.ndarray) -> np.ndarray:
        """Logits [N, classes] for a normalised float32 batch at grid alpha (on the inference thread). The
        softmax is left to the event loop (`softmax`): on this thread each op would hand the GIL back (a
        wait behind a busy loop), and torch's, even on [64, 10], runs on torch's thread pool, whose
        workers then spin beside ONNX Runtime's next batch (one-off, alpha 1 at batch 64 and 2 threads:
        12.0 ms a batch with it, 5.8 without)."""
        return self.cache.get(alpha, counted=False).logits(x)  # the batch's lookup was the counted one

    def level(self, alpha: float) -> float:
        return self.model.schedule.level(alpha).value

    def describe(self) -> dict[str, object]:
        m = self.meta
        snapshot = self.cache.snapshot()  # one view: three reads of the cache disagreed while a build evicted
        cached = {f"{a:g}": c for a, c in snapshot.items()}
        kept = {f"{a:g}" for a in self.cache.keep}
        return {
            "name": self.name,
            "kind": m.kind,
            "subspace": m.subspace,
            "level_name": LEVEL_NAMES[m.kind],
            "alpha_convention": m.alpha_convention,
            "classes": m.classes,
            "input": m.input.model_dump(),
            "dataset": m.dataset,
            "grid": self.grid.alphas,
            "accuracy": [p.model_dump() for p in m.accuracy],
            "training": {"command": m.training.get("command"), "train_seconds": m.training.get("train_seconds")},
            "cached_alphas": list(snapshot),
            "profile_ms": self.profile.as_dict(),
            "self_check_accuracy": self.self_check,
            "backend": self.settings.backend,  # what runs the float networks; int8 always runs on torch
            # per cached alpha, what runs it (a failed ONNX export shows here as TorchScript)
            "representations": {a: c.representation for a, c in cached.items()},
            # per cached alpha, the memory it holds as LCS_CACHE_BYTES counts it, whether the bound or memory pressure
            # may evict it (not the fastest, which the cache keeps, nor a network whose memory dropping would not
            # free: ModelCache), and the size of its compressed form (packed bits, CSR or fp32, whichever is
            # smaller; materialize._stored_bytes)
            "memory": {
                a: {
                    "resident_bytes": c.resident_bytes,
                    "evictable": c.reclaimable and a not in kept,
                    "stored_bytes": c.stored_bytes,
                }
                for a, c in cached.items()
            },
            "channels_last": self.channels_last,
            "ready": self.ready,
            "loaded_at": self.loaded_at,
        }

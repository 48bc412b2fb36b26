"""Measure memory, and act on a plan: tensor and resident peaks, the allocator, fitting in groups.

`measure_peak(fn)` measures the tensor bytes: `torch.cuda.max_memory_allocated` growth on a
GPU; on the CPU the peak of the torch CPU allocator's running total recorded by
`torch.profiler` (profile_memory=True). `measure_rss_peak(fn)` measures the process's
resident memory instead (Linux: the high-water mark VmHWM, reset before `fn`).

The allocator: glibc's malloc by default raises its mmap threshold each time a large block is
freed (up to 32 MiB), so later tensors below it come from the heap, and freed heap memory is
kept (fragmented) rather than returned: resident memory then runs tens of MiB above the live
tensor bytes the plan predicts (results/memory_plan.md, the 'glibc default' rows).
`trim_allocator()` fixes the threshold at 64 KiB in the running process (mallopt, the same
setting as MALLOC_MMAP_THRESHOLD_=65536 before start), so freed tensors go back to the system
and resident memory follows the plan. `check_fits` / `WontFitError` compare a plan with the
free memory; `fit_partitioned` fits the layer groups `MemoryOptions.partitions` describes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from msif_lite.config import MMAP_THRESHOLD, trim_allocator  # noqa: F401 (re-exported)
from msif_lite.engine.layers import TrackedModule, find_modules

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.scale.memory import MemoryPlan

GiB = 2**30


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


class WontFitError(MemoryError):
    """Raised by `check_fits` when a stage would not fit the device."""


def nbytes(obj) -> int:
    """Tensor bytes held by `obj`: a tensor, factors, captures, or containers of them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    return 0


def fit_partitioned(model: nn.Module, task, loader, config, partitions: int = 1,
                    modules: Sequence[TrackedModule] | None = None):
    """`fit_ekfac` over `partition(modules, partitions)` one group after another (each group
    its own passes over `loader`, so activations and factors of one group at a time), merged
    into one EKFACFactors. With config.offload, finished groups wait in CPU memory."""
    from msif_lite.engine.factors import EKFACFactors, FitTimings
    from msif_lite.engine.fit import fit_ekfac
    from msif_lite.scale.options import partition

    modules = list(modules) if modules is not None else find_modules(
        model, config.include, config.exclude)
    parts = [fit_ekfac(model, task, loader, config, g) for g in partition(modules, partitions)]
    t = {k: sum(getattr(p.timings, k) for p in parts)
         for k in ("covariance_s", "eigendecomposition_s", "lambda_s")}  # fmt: skip
    layers = tuple(x for p in parts for x in p.layers)
    out = dataclasses.replace(parts[0], layers=layers, timings=FitTimings(**t))
    assert isinstance(out, EKFACFactors)
    return out


def device_bytes(device: torch.device | str) -> int:
    """Memory a stage may use: free GPU memory (cuda.mem_get_info), or MemAvailable (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError):  # pragma: no cover - not Linux
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_fits(plan: MemoryPlan, device: torch.device | str, *, available: int | None = None,
               models_resident: int = 0, headroom: float = 0.9,
               stages: Sequence[str] | None = None) -> None:
    """Raise `WontFitError` naming the options to change when a stage's peak exceeds
    `headroom` × the free memory (`available` bytes, default: what `device_bytes` reports).
    `models_resident`: models still to be loaded onto the device (their weights count);
    `stages`: which stages to check (e.g. only the fitting ones; None: all)."""
    free = device_bytes(device) if available is None else available
    limit = headroom * free - models_resident * plan.shape.weights_bytes
    bad = [st for st in (plan.peak if stages is None else stages) if plan.peak[st] > limit]
    if not bad:
        return
    worst = max(bad, key=plan.peak.get)
    o = plan.options
    tips = {
        "covariance": [f"batch_size={max(1, o.batch_size // 2)}", "include='mlp' (MLP only)",
                       "autocast_dtype='bfloat16'", f"partitions={o.partitions * 2}",
                       "cache_activations_mb=0"],
        "eigendecomposition": ["offload=True", f"partitions={o.partitions * 2}",
                               "cache_activations_mb=0", "include='mlp'"],
        "lambda": ["cache_activations_mb=0", f"partitions={o.partitions * 2}",
                   f"batch_size={max(1, o.batch_size // 2)}"],
        "scoring": ["offload=True", f"query_rank={o.query_rank // 2 if o.query_rank else 32}",
                    f"n_queries={max(1, o.n_queries // 2)}",
                    f"batch_size={max(1, o.batch_size // 2)}"],
        "cached scoring": ["offload=True", f"n_queries={max(1, o.n_queries // 2)}",
                           f"chunk_mb={o.chunk_mb / 2:g}", "projection=(64, 64)",
                           "include='mlp'"],
    }[worst]
    tips = [t for t in tips if not _already(t, o)]  # name only changes that change something
    raise WontFitError(
        f"stage {worst!r} needs about {fmt_bytes(plan.peak[worst])} but "
        f"{fmt_bytes(max(limit, 0))} of "
        f"{torch.device(device)} is free for it (stages over: {', '.join(bad)}). Change "
        f"MemoryOptions/FactorConfig: {' or '.join(tips)}, then predict() again.\n{plan}")

def _already(tip: str, options) -> bool:
    """True when a suggested `field=value` is already the options' setting."""
    name, _, value = tip.partition("=")
    if not hasattr(options, name):
        return False
    current, value = getattr(options, name), value.strip("'")
    try:
        return float(current) == float(value)
    except (TypeError, ValueError):
        return str(current) == value


@contextlib.contextmanager
def _quiet_fds():
    """Silence file descriptors 1 and 2 (the profiler's C++ start/stop banners)."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def measure_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak bytes allocated above the level at entry while `fn()` runs, its result).

    GPU: torch.cuda.max_memory_allocated. CPU: the torch allocator's running total in a
    `torch.profiler` trace (profile_memory=True), so only tensor memory counts."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start, out
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fds():
        prof.__enter__()
    try:
        out = fn()
    finally:
        with _quiet_fds():
            prof.__exit__(None, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [ev["args"] for ev in json.load(f)["traceEvents"]
                      if ev.get("name") == "[memory]"]  # fmt: skip
    if not events:
        return 0, out
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(ev["Total Allocated"] for ev in events) - base, out


def rss_bytes(field_name: str) -> int:
    """A byte count of /proc/self/status (Linux), e.g. "VmRSS" (resident now) or "VmHWM"
    (the resident high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def settle_rss() -> int:
    """Resident bytes after a garbage collection and glibc malloc_trim (free heap pages
    returned to the system): what stays resident."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes("VmRSS")


def reset_rss_peak() -> int:
    """Reset the resident high-water mark (VmHWM) to the current RSS (`echo 5 >
    /proc/self/clear_refs`, Linux); returns that RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:  # pragma: no cover - not Linux, or not permitted
        raise OSError(f"cannot reset the RSS high-water mark ({e}); use measure_peak") from e
    return rss_bytes("VmRSS")


def measure_rss_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak resident bytes above the resident bytes at entry while `fn()` runs, its result).

    Linux only: free heap pages go back to the system first (`settle_rss`), the high-water
    mark is reset to the current RSS (`reset_rss_peak`), and the peak is VmHWM − VmRSS at
    entry. Counts everything resident (allocator slack, libraries paged in), unlike
    `measure_peak`; run it in a fresh process for a clean baseline."""
    settle_rss()
    start = reset_rss_peak()
    out = fn()
    return rss_bytes("VmHWM") - start, out

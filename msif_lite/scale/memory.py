"""Predict what each stage of an EK-FAC / multi-stage run needs in memory, before running it.

Notebook 09 §Memory before each stage. Notation: B sequences of T tokens per batch, L blocks
of width d with H heads, vocabulary V, tracked layers m with inputs d_in (+1 for a bias) and
outputs o, P = Σ_m o·d_in tracked parameters, e = bytes per factor element (4 for float32),
Q queries. All numbers are bytes *above* what is resident before the stage (the weights are
reported separately as `weights`).

- one batch's forward + backward to the layer outputs (msif_lite.engine.capture), fitted on
  measurements of Hugging Face models (coefficients per architecture in `ACTIVATIONS`):
      act(B, T) = 4·[c_V·B·T·V + c_d·L·B·T·d + c_h·L·B·H·T²] + c_k·kept(B, T)
      kept(B, T) = Σ_m B·T·(d_in + o)·e                        (the captured ā, Ds)
- covariance:          Σ_m (d_in² + o²)·e  +  cache  +  act(B, T)
  (cache: earlier batches' captures kept for the Λ pass, at most cache_activations_mb)
- eigendecomposition:  A, S (unless offload)  +  cache  +  eigenbases so far
  +  float64 eigh workspace 4·8·n² (the float64 copy, eigenvectors, 2n² LAPACK work)
- Λ:                   Σ_m (d_in² + o²)·e + P·e  +  cache  +  max_m B·(T·(d_in + o) + 2·o·d_in)·e
- scoring:             stored factors (both stages; none with offload)  +  the largest of
  query gradients (act + kept of ≤16 queries + their DW), preconditioning
  ((1 + stages)·Q·P·e + 3·Q·max_m o·d_in·e: input, fine-tune stage, output) and candidates
  (∇m and P: 2·Q·P·e, + act(B, T) + kept + max_m B·o·d_in·e for one DW); a rank-r query
  keeps Q·r·Σ_m(d_in + o)·e instead of the second Q·P·e and needs 2·Q·B·T·r·e, not DW.

`measure_peak(fn)` measures the same quantity: `torch.cuda.max_memory_allocated` growth on a
GPU; on the CPU the peak of the torch CPU allocator's running total recorded by
`torch.profiler` (profile_memory=True): tensor bytes, not RSS, so it is deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from msif_lite.engine.layers import DEFAULT_EXCLUDE, TrackedModule, find_modules

GiB = 2**30
STAGES = ("covariance", "eigendecomposition", "lambda", "scoring")

# (c_V, c_d, c_h, c_k) of act(B, T), fitted on CPU measurements (eager attention,
# transformers 5.x; sampled labels; tiny BLOOMs, d 64–256, V 2k–8k: within 4%).
ACTIVATIONS: dict[tuple[str, str | None], tuple[float, float, float, float]] = {
    ("bloom", None): (3.0, 11.4, 1.0, 0.67),
    ("bloom", "bfloat16"): (2.95, 11.1, 1.3, 0.5),
    ("bloom", "float16"): (2.95, 11.1, 1.3, 0.5),
}
DEFAULT_ACTIVATIONS = ACTIVATIONS[("bloom", None)]


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class MemoryOptions:
    """The options a memory plan depends on (frozen, validated; `help()` lists them)."""

    include: str | tuple[str, ...] | None = _help("tracked layers: None = all linear, 'mlp'", None)
    exclude: str | tuple[str, ...] | None = _help("layers never tracked", DEFAULT_EXCLUDE)
    batch_size: int = _help("sequences per forward/backward (fitting and candidates)", 8)
    seq_len: int = _help("tokens per sequence (the longest in a batch)", 512)
    fit_tokens: int = _help("tokens per factor pass (FactorConfig.max_tokens)", 1_000_000)
    autocast_dtype: Literal["bfloat16", "float16"] | None = _help("autocast dtype", None)
    factor_dtype: Literal["float32", "float64"] = _help("dtype of A, S, Q, Λ", "float32")
    offload: bool = _help("finished factors live in CPU memory (FactorConfig.offload)", False)
    partitions: int = _help("fit the layers in this many groups, one after another", 1)
    cache_activations_mb: float = _help("FactorConfig.cache_activations_mb", 2048.0)
    n_queries: int = _help("queries scored at once", 16)
    query_len: int = _help("tokens per query", 64)
    query_rank: int | None = _help("rank r of low-rank preconditioned queries (None: full)", None)
    stages: int = _help("EK-FACs held while scoring: 2 multi-stage, 1 single-stage", 2)
    padded: bool = _help("batches contain padding (capture then copies Ds once more)", False)

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "fit_tokens", "partitions", "n_queries",
                     "query_len"):  # fmt: skip
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"MemoryOptions.{name} must be an int >= 1")
        if self.query_rank is not None and self.query_rank < 1:
            raise ValueError("MemoryOptions.query_rank must be None or >= 1")
        if self.stages not in (1, 2):
            raise ValueError("MemoryOptions.stages must be 1 or 2")
        if self.factor_dtype not in ("float32", "float64"):
            raise ValueError("MemoryOptions.factor_dtype must be 'float32' or 'float64'")

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"{f.name}: {f.metadata['help']}" for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class ModelShape:
    """What the prediction reads from a model config: sizes and the tracked layers."""

    model_type: str
    n_layers: int
    hidden: int
    heads: int
    vocab: int
    weights_bytes: int
    layers: tuple[tuple[str, int, int], ...]  # (name, d_in incl. bias, out)

    @classmethod
    def of(cls, model_or_config, options: MemoryOptions) -> ModelShape:
        """From a model, or from a config (built on the meta device: no memory, no download)."""
        if isinstance(model_or_config, nn.Module):
            model, config = model_or_config, model_or_config.config
        else:
            from transformers import AutoModelForCausalLM

            config = model_or_config
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        mods: Sequence[TrackedModule] = find_modules(model, options.include, options.exclude)
        get = lambda *ks: next(getattr(config, k) for k in ks if hasattr(config, k))  # noqa: E731
        return cls(
            config.model_type, get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd"),
            get("num_attention_heads", "n_head"), config.vocab_size,
            sum(p.numel() * p.element_size() for p in model.parameters()),
            tuple((m.name, m.d_in, m.out_features) for m in mods))


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak bytes per stage (above the resident model) and stored factor sizes."""

    shape: ModelShape
    options: MemoryOptions
    peak: dict[str, int]
    stored: dict[str, int]
    terms: dict[str, dict[str, int]]

    @property
    def max_peak(self) -> int:
        return max(self.peak.values())

    def total(self, stage: str, models: int = 1) -> int:
        """Device bytes in use at the stage's peak: the weights of `models` models + peak."""
        return models * self.shape.weights_bytes + self.peak[stage]

    def __str__(self) -> str:
        o, s = self.options, self.shape
        head = (f"memory plan: {s.model_type}, {len(s.layers)} tracked layers, batch "
                f"{o.batch_size}×{o.seq_len} tokens, factors {o.factor_dtype}"
                f"{', autocast ' + o.autocast_dtype if o.autocast_dtype else ''}"
                f"{', offload' if o.offload else ''}"
                f"{f', {o.partitions} partitions' if o.partitions > 1 else ''}\n"
                f"  weights per model: {_fmt(s.weights_bytes)}\n")  # fmt: skip
        rows = [f"  {'stage':<20s}{'peak':>12s}   largest terms"]
        for st in STAGES:
            big = sorted(self.terms[st].items(), key=lambda kv: -kv[1])[:3]
            desc = ", ".join(f"{k} {_fmt(v)}" for k, v in big)
            rows.append(f"  {st:<20s}{_fmt(self.peak[st]):>12s}   {desc}")
        rows.append("  stored: " + ", ".join(f"{k} {_fmt(v)}" for k, v in self.stored.items()))
        return head + "\n".join(rows)


def _fmt(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _groups(layers: Sequence[tuple[str, int, int]], k: int) -> list[list[tuple[str, int, int]]]:
    """Split layers (in order) into ≤ k contiguous groups of similar factor size."""
    k = min(k, len(layers))
    size = [d * d + o * o for _, d, o in layers]
    target, out, cur, acc = sum(size) / k, [], [], 0.0
    for lay, s in zip(layers, size):
        if cur and acc + s / 2 > target * (len(out) + 1) and len(out) < k - 1:
            out.append(cur)
            cur = []
        cur.append(lay)
        acc += s
    return out + [cur]


def partition(modules: Sequence[TrackedModule], k: int) -> list[list[TrackedModule]]:
    """The groups `MemoryOptions.partitions` = k describes (for `fit_partitioned`)."""
    by = {m.name: m for m in modules}
    return [[by[n] for n, _, _ in g] for g in _groups([(m.name, m.d_in, m.out_features)
                                                       for m in modules], k)]  # fmt: skip


def predict(model_config_or_model, options: MemoryOptions = MemoryOptions(),
            device: torch.device | str | None = None) -> MemoryPlan:
    """A `MemoryPlan` from the model's config (or the model) and the options, for `device`
    (default msif_lite.device(); offload changes nothing on a CPU, where the "device" is the
    CPU memory itself). See the module docstring for each formula."""
    from msif_lite.config import device as default_device

    dev = torch.device(device) if device is not None else default_device()
    o, s = options, ModelShape.of(model_config_or_model, options)
    if dev.type == "cpu" and o.offload:
        o = replace(o, offload=False)
    e = 8 if o.factor_dtype == "float64" else 4
    coef = ACTIVATIONS.get((s.model_type, o.autocast_dtype), DEFAULT_ACTIVATIONS)

    def kept(b, t, layers):
        return sum(b * t * (d + out) * e for _, d, out in layers)

    def act(b, t, layers, autocast=True):
        c_v, c_d, c_h, c_k = coef if autocast else ACTIVATIONS.get((s.model_type, None),
                                                                    DEFAULT_ACTIVATIONS)
        pad = sum(b * t * out * e for _, _, out in layers) if o.padded else 0
        return int(4 * (c_v * b * t * s.vocab + c_d * s.n_layers * b * t * s.hidden
                        + c_h * s.n_layers * b * s.heads * t * t) + c_k * kept(b, t, layers)
                   + pad)

    B, T = o.batch_size, o.seq_len
    n_batches = max(1, math.ceil(o.fit_tokens / (B * T)))
    groups = _groups(s.layers, o.partitions)
    terms: dict[str, dict[str, int]] = {st: {} for st in STAGES}
    peaks = dict.fromkeys(STAGES, 0)
    done = 0  # stored factors of earlier groups still on the device
    for g in groups:
        as_b = sum((d * d + out * out) * e for _, d, out in g)
        lam_b = sum(d * out * e for _, d, out in g)
        per = kept(B, T, g)
        budget = o.cache_activations_mb * 2**20
        fits = per * n_batches <= budget
        # the previous batch's capture is alive while the next one runs (in the cache, or
        # still bound to the loop variable when nothing is cached)
        prev = per if n_batches > 1 else 0
        cache_prev = min((n_batches - 1) * per, int(budget // per) * per) if budget else prev
        cache_all = per * n_batches if fits else 0
        cov = {"A,S": as_b, "cached/previous batches": cache_prev, "forward+backward": act(B, T, g),
               "earlier groups": done}
        eig_peak, q_so_far = 0, 0
        for _, d, out in g:  # eigh of A then of S, layer by layer, as fit_eigenbasis runs
            copy = 0 if e == 8 else 8
            ws = max((3 * 8 + copy) * d * d, 8 * d * d + (3 * 8 + copy) * out * out)
            eig_peak = max(eig_peak, q_so_far + ws)
            q_so_far += (d * d + out * out) * e
        eig = {"A,S": 0 if o.offload else as_b, "cached batches": cache_all,
               "eigh (float64) + bases so far": eig_peak, "earlier groups": done}
        rot = max(B * (T * (d + out) + 2 * out * d) * e for _, d, out in g)
        lam = {"eigenbases": as_b, "Λ": lam_b, "cached batches": cache_all,
               "rotations": rot if fits else prev + max(act(B, T, g), per + rot),
               "earlier groups": done}
        for st, t in (("covariance", cov), ("eigendecomposition", eig), ("lambda", lam)):
            if sum(t.values()) > peaks[st]:
                peaks[st], terms[st] = sum(t.values()), t
        done += 0 if o.offload else as_b + lam_b
    P = sum(d * out for _, d, out in s.layers)
    Q, Qb, r = o.n_queries, min(o.n_queries, 16), o.query_rank
    od = max(d * out for _, d, out in s.layers)
    q_store = Q * r * sum(d + out for _, d, out in s.layers) * e if r else Q * P * e
    factors = sum((d * d + out * out + d * out) * e for _, d, out in s.layers)
    grads = act(Qb, o.query_len, s.layers, False) + kept(Qb, o.query_len, s.layers) + Qb * P * e
    grads += Q * P * e if Q > Qb else 0
    pre = (1 + o.stages) * Q * P * e + 3 * Q * od * e
    cand = act(B, T, s.layers, False) + kept(B, T, s.layers) + (
        2 * Q * B * T * r * e if r else B * od * e)
    terms["scoring"] = {"factors on device": 0 if o.offload else o.stages * factors,
                        "query gradients + preconditioning": max(grads, pre),
                        "kept queries": Q * P * e + q_store, "candidate batch": cand}
    peaks["scoring"] = terms["scoring"]["factors on device"] + max(
        grads, pre, Q * P * e + q_store + cand)
    stored = {"A,S": factors - P * e, "eigenbases": factors - P * e, "Λ": P * e,
              "EK-FAC per stage": factors, "queries": q_store}
    return MemoryPlan(s, options, {k: int(v) for k, v in peaks.items()}, stored, terms)


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
               stages: Sequence[str] = STAGES) -> None:
    """Raise `WontFitError` naming the options to change when a stage's peak exceeds
    `headroom` × the free memory (`available` bytes, default: what `device_bytes` reports).
    `models_resident`: models still to be loaded onto the device (their weights count);
    `stages`: which stages to check (e.g. only the fitting ones)."""
    free = device_bytes(device) if available is None else available
    limit = headroom * free - models_resident * plan.shape.weights_bytes
    bad = [st for st in stages if plan.peak[st] > limit]
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
    }[worst]
    raise WontFitError(
        f"stage {worst!r} needs about {_fmt(plan.peak[worst])} but {_fmt(max(limit, 0))} of "
        f"{torch.device(device)} is free for it (stages over: {', '.join(bad)}). Change "
        f"MemoryOptions/FactorConfig: {' or '.join(tips)}, then predict() again.\n{plan}")


def with_options(plan: MemoryPlan, model_config_or_model, **changes) -> MemoryPlan:
    """Re-predict with some options changed (e.g. `with_options(plan, cfg, offload=True)`)."""
    return predict(model_config_or_model, replace(plan.options, **changes))


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

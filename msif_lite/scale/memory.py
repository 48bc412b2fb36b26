"""Predict what each stage of an EK-FAC / multi-stage run needs in memory and on disk, before
running it.

Notebook 09 §Memory before each stage. Notation: B sequences of T tokens per batch, L blocks,
vocabulary V, tracked layers m with inputs d_in (+1 for a bias) and outputs o,
P = Σ_m o·d_in tracked parameters, od = max_m o·d_in, e = bytes per factor element (4 for
float32), g = bytes per gradient element (the weights' dtype), Q queries (Q_b ≤ 16 per
batch) of T_q tokens, N candidates, S = 2 stages (1 single-stage). All numbers are bytes
*above* what is resident before the stage (the weights are reported separately).

- act(B, T): one batch's forward + backward to the tracked layers' outputs with the captures
  (ā, Ds) kept, i.e. the peak of `capture_batch`. **Measured from the model itself**
  (`activation_model`): `capture_batch` under `measure_peak` on copies of the same config
  (class, width, heads, intermediate size, vocabulary, attention implementation) at the
  model's own depth — or, above 60M parameters, at two smaller depths with the vocabulary
  scaled alike, extrapolated linearly in L — at B ∈ {1, 2}, T ∈ {32, 128}, fitted to
      act(B, T) = B·T·k_1 + B·T²·k_2 + k_0,
  so every architecture (BLOOM, Llama, GPT-2, GPT-NeoX, …) gets its own coefficients.
  Measured on the CPU: on a GPU, fused attention kernels have no T² term, so the plan is
  conservative there. kept(B, T) = Σ_m B·T·(d_in + o)·e (the captures).
- covariance:          Σ_m (d_in² + o²)·e  +  cache  +  act(B, T)
  (cache: earlier batches' captures kept for the Λ pass, at most cache_activations_mb)
- eigendecomposition:  A, S (unless offload)  +  cache  +  eigenbases so far
  +  float64 eigh workspace 4·8·n² (the float64 copy, eigenvectors, 2n² LAPACK work)
- Λ:                   Σ_m (d_in² + o²)·e + P·e  +  cache  +  max_m B·(T·(d_in + o) + 2·o·d_in)·e
- scoring (`engine.scores.pairwise_scores` on a query batch, candidates streamed; query
  gradients passed in as Grads add their Q·P·g): S stored EK-FACs
  Σ_m (d_in² + o² + d_in·o)·e (none with offload) + the largest of
  · query captures: act(Q_b, T_q) + kept(Q − Q_b, T_q)
  · layer-by-layer preconditioning (`preconditioned_queries`): kept(Q, T_q) + the queries kept
    so far + one layer's (4 + S)·Q·o·d_in·g temporaries (the inverse's rotations), or with rank
    r the SVD's (2·o·d_in + k(o + d_in) + 4k²)·Q·g (k = min(o, d_in));
    `layerwise=False` (the dense path): (1 + S)·Q·P·g + 4·Q·od·g
  · candidates: the kept queries (Q·P·g, or Q·r·Σ_m(d_in + o)·g) + act(B, T) + one DW
    B·od·g (full rank) or 3·Q·B·T·r·g (rank r: Lᵀ Ds, R ā and their product)
- cached scoring (`Attributor.scores` → `GradientMethod.layer_scores` → `GradientStore.scores`):
  the same factors + the largest of
  · the method's inverse, built for the call: inv = S·P·e (D_l + λ_l per stage) + P·e (two
    stages: H_ft's rescaled Λ), alive while the queries are captured and preconditioned
  · query captures: inv + act(Q_b, T_q) + kept(Q − Q_b, T_q)
  · layer-by-layer preconditioning (`Attributor.preconditioned_queries`, the engine's loop):
    inv + the same layer loop as scoring above
  · candidates, with the kept queries K = Q·P·g (or Q·r·Σ_m(d_in + o)·g with rank r):
    streamed (over the disk budget, no projection; `pairwise_scores`): K + act(B, T) + one
    layer's B·od·g (full rank) or 3·Q·B·T·r·g (rank r); stored: K + the chunk
    max(n·P'·g + act(B, T) + B·P·g, (n + 1)·P'·g) + one layer's L R, Q·od·g (rank r), with
    n = chunk_mb / (P'·g) documents per chunk (P' = P, or Σ_m k_out·k_in with a projection,
    which adds the projected queries Q·P'·g; a batch's DW, B·P·g, is formed before it is
    whitened and projected, streamed or not).
  `layerwise=False`: the dense path this replaced (all layers' ∇m, act(Q_b, T_q) + 2·Q·P·g,
  then P of all layers, inv + 2·Q·P·g + (3 + S)·Q·od·g, then with rank r truncated:
  Q·P·g + K + the largest layer's SVD).
- disk: the gradient cache N·P'·g (0 when it streams: N·P·g > gradient_cache_gb).

`measure_peak(fn)` measures the tensor bytes: `torch.cuda.max_memory_allocated` growth on a
GPU; on the CPU the peak of the torch CPU allocator's running total recorded by
`torch.profiler` (profile_memory=True). `measure_rss_peak(fn)` measures the process's
resident memory instead (Linux: the high-water mark VmHWM, reset before `fn`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
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
STAGES = ("covariance", "eigendecomposition", "lambda", "scoring", "cached scoring")
CALIBRATION = {"seq_len": (32, 128), "points": ((1, 1), (1, 2), (2, 1), (2, 2)),
               "params": 60_000_000}  # (B, T index) points; largest copy measured


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
    layerwise: bool = _help("precondition queries one layer at a time (False: the dense path)",
                            True)  # fmt: skip
    n_candidates: int = _help("candidate documents scored (cached scoring, disk)", 1000)
    gradient_cache_gb: float = _help("AttributionConfig.gradient_cache_gb: above it, stream",
                                     20.0)  # fmt: skip
    chunk_mb: float = _help("stored gradients held at once while scoring (GradientStore)", 1024.0)
    projection: tuple[int, int] | None = _help("(k_in, k_out) of projected candidate gradients",
                                               None)  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "fit_tokens", "partitions", "n_queries",
                     "query_len", "n_candidates"):  # fmt: skip
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"MemoryOptions.{name} must be an int >= 1")
        if self.query_rank is not None and self.query_rank < 1:
            raise ValueError("MemoryOptions.query_rank must be None or >= 1")
        if self.stages not in (1, 2):
            raise ValueError("MemoryOptions.stages must be 1 or 2")
        if self.factor_dtype not in ("float32", "float64"):
            raise ValueError("MemoryOptions.factor_dtype must be 'float32' or 'float64'")
        if not (self.gradient_cache_gb >= 0 and self.chunk_mb > 0):
            raise ValueError("MemoryOptions.gradient_cache_gb must be >= 0 and chunk_mb > 0")
        if self.projection is not None and not (len(self.projection) == 2
                                                and min(self.projection) >= 1):  # fmt: skip
            raise ValueError("MemoryOptions.projection must be None or (k_in, k_out) >= 1")

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"{f.name}: {f.metadata['help']}" for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class ActivationModel:
    """act(B, T) = B·T·k_1(L) + B·T²·k_2(L) + k_0(L) bytes (module docstring): fitted on
    measured peaks of `capture_batch` on copies of the model at its own width, at depths
    `depths` (with the vocabulary scaled alike; k linear in L between and beyond them)."""

    depths: tuple[int, ...]
    coef: tuple[tuple[float, float, float], ...]  # (k_1, k_2, k_0) per depth
    residual: float  # max relative error of the fit on its own calibration points
    source: str

    def __call__(self, b: int, t: int, n_layers: int, vocab: int | None = None) -> float:
        if len(self.depths) == 1:
            k1, k2, k0 = self.coef[0]
        else:
            (l1, l2), (c1, c2) = self.depths, self.coef
            w = (n_layers - l1) / (l2 - l1)
            k1, k2, k0 = (x + w * (y - x) for x, y in zip(c1, c2))
        return max(0.0, b * t * k1 + b * t * t * k2 + k0)


def _layer_count_key(config) -> str:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, k):
            return k
    raise ValueError(f"{type(config).__name__} has no layer count (num_hidden_layers / n_layer)")


def copy_config(config, n_layers: int | None = None):
    """An independent copy of a transformers config (attention implementation kept), with
    `n_layers` blocks if given."""
    cfg = type(config).from_dict(config.to_dict())
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None:
        with contextlib.suppress(AttributeError, ValueError):
            cfg._attn_implementation = impl
    if n_layers is not None:
        setattr(cfg, _layer_count_key(config), n_layers)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:n_layers]
    return cfg


def _calibration_depths(config) -> tuple[tuple[int, int], ...]:
    """(depth, vocabulary) of the copies measured: the model itself when it has at most
    CALIBRATION['params'] parameters, else two copies with depth and vocabulary both scaled
    by f = l/L (l and l/2 blocks), so the per-token terms keep their ratio (and the same
    phase of the pass peaks); k is then linear in f and extrapolated to f = 1."""
    from transformers import AutoModelForCausalLM

    def n_params(n, v):
        cfg = copy_config(config, n)
        cfg.vocab_size = v
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        return sum(p.numel() for p in m.parameters())

    L, V = getattr(config, _layer_count_key(config)), config.vocab_size
    base, per_layer = n_params(1, 1024), n_params(2, 1024) - n_params(1, 1024)
    per_vocab = (n_params(1, 2048) - base) / 1024
    size = lambda n: base + (n - 1) * per_layer + per_vocab * (V * n / L - 1024)  # noqa: E731
    if size(L) <= CALIBRATION["params"]:
        return ((L, V),)
    n = max((k for k in range(2, L) if size(k) <= CALIBRATION["params"]), default=2)
    return tuple((k, max(64, round(V * k / L))) for k in (n // 2, n))


@functools.lru_cache(maxsize=32)
def _calibrate(config_json: str, config_cls: type, include, exclude, autocast: str | None,
               factor_dtype: str, weight_dtype: str) -> tuple[ActivationModel, ActivationModel]:
    """(fitting, scoring) activation models of one config (see `activation_model`)."""
    from transformers import AutoModelForCausalLM

    from msif_lite.engine.capture import capture_batch
    from msif_lite.engine.tasks import LanguageModelingTask, TokenBatch

    d = json.loads(config_json)
    config = config_cls.from_dict(d)
    if d.get("_attn_implementation_internal"):
        with contextlib.suppress(AttributeError, ValueError):
            config._attn_implementation = d["_attn_implementation_internal"]
    task = LanguageModelingTask()
    (t1, t2), points = CALIBRATION["seq_len"], CALIBRATION["points"]
    copies = _calibration_depths(config)
    modes = {"fitting": (autocast, "sampled", factor_dtype), "scoring": (None, "empirical",
                                                                         weight_dtype)}  # fmt: skip
    coef: dict[str, list] = {k: [] for k in modes}
    resid = dict.fromkeys(modes, 0.0)
    for depth, vocab in copies:
        torch.manual_seed(0)
        cfg = copy_config(config, depth)
        cfg.vocab_size = vocab
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) >= vocab:
                setattr(cfg, k, vocab - 1)
        model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, weight_dtype)).eval()
        mods = find_modules(model, include, exclude)
        for mode, (cast, fisher, cap_dtype) in modes.items():
            rows, ys = [], []
            for b, t in [(b, {1: t1, 2: t2}[i]) for b, i in points]:
                ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(t))
                batch = TokenBatch(ids, torch.ones_like(ids), ids.clone())

                def run(batch=batch, cast=cast, fisher=fisher, cap_dtype=cap_dtype, model=model,
                        mods=mods):
                    ctx = (torch.autocast("cpu", dtype=getattr(torch, cast)) if cast
                           else contextlib.nullcontext())  # fmt: skip
                    with ctx:
                        return capture_batch(model, task, batch, mods, fisher=fisher,
                                             generator=torch.Generator().manual_seed(1),
                                             dtype=getattr(torch, cap_dtype))  # fmt: skip

                run()  # warm-up: lazily created kernels and caches are not activations
                rows.append([b * t, b * t * t, 1.0])
                ys.append(float(measure_peak(run)[0]))
            x, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
            c = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
            if c[1] < 0:  # no negative T² term (it would dominate at long T): refit without
                c = torch.linalg.lstsq(x[:, [0, 2]], y[:, None]).solution[:, 0]
                c = torch.stack([c[0], torch.zeros((), dtype=c.dtype), c[1]])
            coef[mode].append(tuple(float(v) for v in c))
            resid[mode] = max(resid[mode], float(((x @ c - y).abs() / y).max()))
        del model
    depths = tuple(d for d, _ in copies)
    return tuple(ActivationModel(depths, tuple(coef[m]), resid[m], (
        f"measured: capture_batch peaks of copies of width {getattr(config, 'hidden_size', '?')}"
        f" with (depth, vocabulary) {copies}, (B, T) in {points} with T {t1}/{t2}; "
        f"{modes[m][1]} labels, autocast {modes[m][0]}, captures {modes[m][2]}"))
        for m in modes)  # type: ignore[return-value]


def activation_model(config, options: MemoryOptions, *, fitting: bool,
                     weight_dtype: torch.dtype = torch.float32) -> ActivationModel:  # fmt: skip
    """The act(B, T) of `config` for the fitting passes (sampled labels, autocast, captures in
    the factor dtype) or for scoring (data labels, no autocast, captures in the weights'
    dtype), measured once per config on the CPU and cached (module docstring).

    Why measured and not derived from the config by formula: which tensors autograd saves
    (attention implementation, activation function, norms, casts under autocast, the
    sampled-label softmax) differs between architectures and library versions; a peak is a
    maximum over the phases of a pass, so only a run of the same code finds it. Copies at
    the model's own width, with depth and vocabulary scaled by the same f ≤ 1 (f = 1 up to
    CALIBRATION['params'] parameters), keep the ratio of the per-token terms, so the phase
    that peaks is the same; B and T are small, and peak = B·T·k_1 + B·T²·k_2 + k_0 holds up
    to the fit residual. Not covered: kernels that behave differently at large T (a GPU's
    fused attention: no T² term, so the plan is conservative there)."""
    d = config.to_dict()
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None:
        d["_attn_implementation_internal"] = impl
    js = json.dumps(d, sort_keys=True, default=str)
    norm = lambda p: tuple(p) if isinstance(p, list | tuple) else p  # noqa: E731
    fit, score = _calibrate(js, type(config), norm(options.include), norm(options.exclude),
                            options.autocast_dtype, options.factor_dtype,
                            str(weight_dtype).removeprefix("torch."))  # fmt: skip
    return fit if fitting else score


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
    grad_bytes: int = 4  # bytes per element of the weights (and of gradients)

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
        p = next(model.parameters())
        return cls(
            config.model_type, get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd"),
            get("num_attention_heads", "n_head"), config.vocab_size,
            sum(p.numel() * p.element_size() for p in model.parameters()),
            tuple((m.name, m.d_in, m.out_features) for m in mods),
            p.element_size() if isinstance(model_or_config, nn.Module) else 4)


@dataclass(frozen=True)
class MemoryPlan:
    """Predicted peak bytes per stage (above the resident model), stored factor sizes, and the
    gradient cache on disk."""

    shape: ModelShape
    options: MemoryOptions
    peak: dict[str, int]
    stored: dict[str, int]
    terms: dict[str, dict[str, int]]
    disk: int = 0  # bytes the gradient cache writes for options.n_candidates documents
    activations: dict[str, ActivationModel] = field(default_factory=dict, repr=False)

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
        streamed = self.terms["cached scoring"].get("streamed (over the disk budget)", 0)
        rows.append(f"  disk (gradient cache, {o.n_candidates} documents): "
                    + (f"none, streamed (over {o.gradient_cache_gb:g} GB)" if streamed
                       else f"{self.disk / 1e9:.3g} GB"))  # fmt: skip
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


def _config_of(model_config_or_model):
    return (model_config_or_model.config if isinstance(model_config_or_model, nn.Module)
            else model_config_or_model)  # fmt: skip


def predict(model_config_or_model, options: MemoryOptions = MemoryOptions(),
            device: torch.device | str | None = None) -> MemoryPlan:
    """A `MemoryPlan` from the model's config (or the model) and the options, for `device`
    (default msif_lite.device(); offload changes nothing on a CPU, where the "device" is the
    CPU memory itself). See the module docstring for each formula; the activation terms are
    measured on shrunken copies of the model (`activation_model`, a few seconds, cached)."""
    from msif_lite.config import device as default_device

    dev = torch.device(device) if device is not None else default_device()
    o, s = options, ModelShape.of(model_config_or_model, options)
    if dev.type == "cpu" and o.offload:
        o = replace(o, offload=False)
    e, g_e = (8 if o.factor_dtype == "float64" else 4), s.grad_bytes
    config = _config_of(model_config_or_model)
    wdt = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[g_e]
    if isinstance(model_config_or_model, nn.Module):
        wdt = next(model_config_or_model.parameters()).dtype
    act_fit = activation_model(config, o, fitting=True, weight_dtype=wdt)
    act_score = activation_model(config, o, fitting=False, weight_dtype=wdt)

    def kept(b, t, layers, el=e):
        return sum(b * t * (d + out) * el for _, d, out in layers)

    def act(b, t, layers, fitting=True):
        model, el = (act_fit, e) if fitting else (act_score, g_e)
        pad = sum(b * t * out * el for _, _, out in layers) if o.padded else 0
        swap = kept(b, t, layers, el) - kept(b, t, s.layers, el)  # a partition's own captures
        return int(model(b, t, s.n_layers) + swap + pad)

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
    factors = sum((d * d + out * out + d * out) * e for _, d, out in s.layers)
    on_device = 0 if o.offload else o.stages * factors
    terms["scoring"], q_store = _scoring_terms(s, o, act, kept, g_e)
    terms["cached scoring"], disk = _cached_scoring_terms(s, o, act, kept, g_e, e)
    for st in ("scoring", "cached scoring"):
        terms[st] = {"factors on device": on_device, **terms[st]}
        peaks[st] = on_device + max(v for k, v in terms[st].items() if k != "factors on device")
    P = sum(d * out for _, d, out in s.layers)
    stored = {"A,S": factors - P * e, "eigenbases": factors - P * e, "Λ": P * e,
              "EK-FAC per stage": factors, "queries": q_store}
    return MemoryPlan(s, options, {k: int(v) for k, v in peaks.items()}, stored, terms, disk,
                      {"fitting": act_fit, "scoring": act_score})


def _svd_bytes(d: int, out: int, q: int, g_e: int) -> int:
    """Truncating one layer's (Q, o, d_in) P: P, the SVD's copy, U, Vᵀ and its 4k² work."""
    k = min(d, out)
    return (2 * d * out + k * (d + out) + 4 * k * k) * q * g_e


def _layerwise_preconditioning(s: ModelShape, o: MemoryOptions, kept, g_e: int) -> int:
    """Peak of `engine.scores.preconditioned_queries` over its layer loop: the kept query
    captures kept(Q, T_q) + the results kept so far + one layer's temporaries
    ((4 + S)·Q·o·d_in·g for the inverse's rotations, or the SVD's with rank r)."""
    Q, r, S = o.n_queries, o.query_rank, o.stages
    caps = kept(Q, o.query_len, s.layers, g_e)
    pre, so_far = 0, 0
    for _, d, out in s.layers:
        dense_tmp = (4 + S) * Q * d * out * g_e
        svd = _svd_bytes(d, out, Q, g_e) if r else 0
        pre = max(pre, caps + so_far + max(dense_tmp, svd))
        so_far += min(r, d, out) * (d + out) * Q * g_e if r else Q * d * out * g_e
    return pre


def _kept_queries(s: ModelShape, o: MemoryOptions, g_e: int) -> int:
    """The preconditioned queries kept while candidates are scored: Q·P·g, or with rank r
    Q·Σ_l min(r, o, d_in)·(o + d_in)·g."""
    r = o.query_rank
    if r:
        return sum(min(r, d, out) * (d + out) for _, d, out in s.layers) * o.n_queries * g_e
    return o.n_queries * sum(d * out for _, d, out in s.layers) * g_e


def _scoring_terms(s: ModelShape, o: MemoryOptions, act, kept, g_e: int
                   ) -> tuple[dict[str, int], int]:  # fmt: skip
    """The phases of `pairwise_scores` (module docstring); returns them and the kept queries."""
    P = sum(d * out for _, d, out in s.layers)
    Q, Qb, r, S = o.n_queries, min(o.n_queries, 16), o.query_rank, o.stages
    od = max(d * out for _, d, out in s.layers)
    q_store = _kept_queries(s, o, g_e)
    if o.layerwise:
        qcap = act(Qb, o.query_len, s.layers, False) + kept(Q - Qb, o.query_len, s.layers, g_e)
        phases = {"query captures": qcap,
                  "preconditioning, layer by layer": _layerwise_preconditioning(s, o, kept, g_e)}
    else:
        qg = act(Qb, o.query_len, s.layers, False) + 2 * Q * P * g_e
        pre = (1 + S) * Q * P * g_e + 4 * Q * od * g_e
        if r:  # then truncated layer by layer, the dense P of all layers still held
            pre = max(pre, Q * P * g_e + max(_svd_bytes(d, out, Q, g_e) for _, d, out in s.layers))
        phases = {"dense query gradients": qg, "preconditioning, all layers": pre}
    B, T = o.batch_size, o.seq_len
    cand = q_store + act(B, T, s.layers, False) + (3 * Q * B * T * r * g_e if r else B * od * g_e)
    return {**phases, "candidate batch + kept queries": cand}, q_store


def _cached_scoring_terms(s: ModelShape, o: MemoryOptions, act, kept, g_e: int, e: int
                          ) -> tuple[dict[str, int], int]:  # fmt: skip
    """The phases of `Attributor.scores` (a gradient method, `GradientMethod.layer_scores`)
    with the GradientStore; returns them and the disk (module docstring)."""
    P = sum(d * out for _, d, out in s.layers)
    Q, Qb, r, S = o.n_queries, min(o.n_queries, 16), o.query_rank, o.stages
    od = max(d * out for _, d, out in s.layers)
    if o.projection:
        k_in, k_out = o.projection
        P_store = sum(min(k_in, d) * min(k_out, out) for _, d, out in s.layers)
    else:
        P_store = P
    B, T = o.batch_size, o.seq_len
    cand_act = act(B, T, s.layers, False)
    per_doc = P_store * g_e
    streams = o.n_candidates * per_doc > o.gradient_cache_gb * 1e9
    q_store = _kept_queries(s, o, g_e)
    # the method's inverse, built for this call: D_l + λ_l of each stage (P·e each) and, for
    # two stages, H_ft = c·G_ft's rescaled Λ (P·e); freed once the queries are preconditioned
    inv = (S + (1 if S == 2 else 0)) * P * e
    if o.layerwise:
        out = {"query captures": inv + act(Qb, o.query_len, s.layers, False)
               + kept(Q - Qb, o.query_len, s.layers, g_e),
               "preconditioning, layer by layer": inv + _layerwise_preconditioning(s, o, kept,
                                                                                  g_e)}
    else:  # the dense path this replaced: ∇m of all layers, then P of all layers
        out = {"query gradients (dense)": act(Qb, o.query_len, s.layers, False) + 2 * Q * P * g_e,
               "preconditioning, all layers": inv + 2 * Q * P * g_e + (3 + S) * Q * od * g_e}
        if r:  # then truncated layer by layer, the dense P of all layers still held
            out["truncation, all layers"] = Q * P * g_e + q_store + max(
                _svd_bytes(d, out_, Q, g_e) for _, d, out_ in s.layers)
    # projected queries Π P Πᵀ (one layer's dense P or L R at a time)
    q_proj = Q * P_store * g_e if o.projection else 0
    if streams and not o.projection:  # engine.scores.pairwise_scores, one layer at a time
        out["streamed (over the disk budget)"] = q_store + cand_act + (
            3 * Q * B * T * r * g_e if r else B * od * g_e)
        return out, 0
    if streams:  # projected batches: DW of all layers, whitened and projected
        out["streamed (over the disk budget)"] = q_store + q_proj + cand_act + B * P * g_e
        return out, 0
    n = min(o.n_candidates, max(1, int(o.chunk_mb * 2**20 // per_doc)))
    dense_layer = Q * od * g_e if r and not o.projection else 0  # L R of one layer
    out["candidate chunk"] = q_store + q_proj + dense_layer + max(
        n * per_doc + cand_act + B * P * g_e, (n + 1) * per_doc)  # loaded: one file at a time
    return out, o.n_candidates * per_doc


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
        "cached scoring": ["offload=True", f"n_queries={max(1, o.n_queries // 2)}",
                           f"chunk_mb={o.chunk_mb / 2:g}", "projection=(64, 64)",
                           "include='mlp'"],
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


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def measure_rss_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak resident bytes above the resident bytes at entry while `fn()` runs, its result).

    Linux only: free heap pages go back to the system first (glibc malloc_trim), the
    high-water mark is reset to the current RSS (`echo 5 > /proc/self/clear_refs`), and the
    peak is VmHWM − VmRSS at entry. Counts everything resident (allocator slack, libraries
    paged in), unlike `measure_peak`; run it in a fresh process for a clean baseline."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:  # pragma: no cover - not Linux, or not permitted
        raise OSError(f"cannot reset the RSS high-water mark ({e}); use measure_peak") from e
    start = _rss_bytes("VmRSS")
    out = fn()
    return _rss_bytes("VmHWM") - start, out

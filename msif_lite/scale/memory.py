"""Predict what each stage of an EK-FAC / multi-stage run needs in memory and on disk, before
running it (the plan; `scale.measure` measures, `scale.activations` calibrates act(B, T)).

Notebook 09 §Memory before each stage. Notation: batch i has B_i sequences padded to T_i
tokens (`MemoryOptions.fit_batches` / `candidate_batches`: the corpus's `lengths` in order,
chunks of batch_size, each padded to its longest — the batches the fit and the gradient
store form; without lengths every batch is batch_size × seq_len), L blocks, tracked layers m
with inputs d_in (+1 for a bias) and outputs o, P = Σ_m o·d_in, od = max_m o·d_in, e = bytes
per factor element, g = bytes per gradient element (the weights' dtype), Q queries (Q_b ≤ 16
per batch) of T_q tokens, N candidates, S = 2 stages (1 single-stage). All numbers are bytes
*above* what is resident before the stage (the weights are reported separately), i.e. live
tensor bytes: resident memory follows them with the allocator `measure.trim_allocator` sets.

- act(B, T): the peak of one batch's `capture_batch`, measured from the model itself
  (`activations.activation_model`: B·T·k_1 + B·T²·k_2 + k_0), plus B·T·Σ_m o·e when the
  batch has padding (Ds copied once more). kept(B, T) = Σ_m B·T·(d_in + o)·e (the captures).
- covariance: Σ_m (d_in² + o²)·e + max_i (before batch i: the cached batches < i while
  their captures fit in cache_activations_mb (2 bytes per element with cache_dtype
  bfloat16, + batch i − 1's own captures), else batch i − 1's, + act(B_i, T_i))
- eigendecomposition: A, S (unless offload) + the cache + eigenbases so far + the eigh
  workspace 4·E·n² (E = 8 for eigh_dtype float64, 4 for float32: the copy, eigenvectors,
  2n² LAPACK work) of each of the `eigh_workers` layers in flight
- Λ: Σ_m (d_in² + o²)·e + P·e + the cache + max_{i,m} B_i·(c·T_i·(d_in + o) + 2·o·d_in)·e
  (c = 2 when a bf16 cache is converted back first, else 1)
  (without the cache: batch i − 1's captures + max(act_i, kept_i + the rotations))
- scoring (`engine.scores.pairwise_scores`, candidates streamed): S stored EK-FACs
  Σ_m (d_in² + o² + d_in·o)·e (none with offload) + the largest of
  · query captures: act(Q_b, T_q) + kept(Q − Q_b, T_q)
  · layer-by-layer preconditioning (`preconditioned_queries`): kept(Q, T_q) + the queries kept
    so far + one layer's (4 + S)·Q·o·d_in·g temporaries (the inverse's rotations), or with rank
    r the SVD's (2·o·d_in + k(o + d_in) + 4k²)·Q·g (k = min(o, d_in))
  · candidates: the kept queries K (Q·P·g, or Q·r·Σ_m(d_in + o)·g) + max_i act(B_i, T_i) +
    one DW B_i·od·g (full rank) or 3·Q·B_i·T_i·r·g (rank r)
- cached scoring (`Attributor.scores` → `GradientStore.scores`): the same factors + the largest
  of the method's inverse inv = S·P·e (+ P·e for H_ft's rescaled Λ with two stages) with the
  query captures, inv + the preconditioning loop above, and the candidates: streamed (over the
  disk budget): K + max_i(act_i + one layer's DW), with a projection K + Q·P'·g + max_i(act_i +
  B_i·P·g); stored: K + max(n·P'·g + max_i(act_i + B_i·P·g), (n + 1)·P'·g) (+ one layer's L R,
  Q·od·g, with rank r), n = chunk_mb / (P'·g) documents per chunk, P' = P or Σ_m k_out·k_in;
  token-factored documents (gradient_storage): `scale.store_chunks`, T·Σ_m(o + d_in)·g each.
- disk: the gradient cache, Σ_n each document's bytes (N·P'·g if none is token-factored; 0
  when it streams: that sum > gradient_cache_gb).

The dense preconditioning path (`layerwise=False`, every layer's ∇m and P held at once) is no
longer planned; its measured peaks are kept in results/scoring_peak.md and memory_plan.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from msif_lite.engine.layers import TrackedModule, find_modules
from msif_lite.scale.activations import (  # noqa: F401 (re-exported)
    CALIBRATION,
    ActivationModel,
    activation_model,
    copy_config,
)
from msif_lite.scale.measure import (  # noqa: F401 (re-exported)
    GiB,
    WontFitError,
    check_fits,
    device_bytes,
    fit_partitioned,
    fmt_bytes,
    measure_peak,
    measure_rss_peak,
    nbytes,
    trim_allocator,
)
from msif_lite.scale.options import (  # noqa: F401 (re-exported)
    BatchShape,
    MemoryOptions,
    _groups,
    batch_shapes,
    partition,
)
from msif_lite.scale.store_chunks import stored_bytes, stored_chunk, token_form

STAGES = ("covariance", "eigendecomposition", "lambda", "scoring", "cached scoring")
Layers = Sequence[tuple[str, int, int]]


def _longest(o: MemoryOptions) -> int:
    return max(o.lengths) if o.lengths else o.seq_len


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
        docs = (f" ({len(o.fit_batches())} fit batches of {len(o.lengths)} documents' "
                "lengths)" if o.lengths else "")
        head = (f"memory plan: {s.model_type}, {len(s.layers)} tracked layers, batch "
                f"{o.batch_size}×{_longest(o)} tokens{docs}, factors {o.factor_dtype}"
                f"{', autocast ' + o.autocast_dtype if o.autocast_dtype else ''}"
                f"{', offload' if o.offload else ''}"
                f"{f', {o.partitions} partitions' if o.partitions > 1 else ''}\n"
                f"  weights per model: {fmt_bytes(s.weights_bytes)}\n")  # fmt: skip
        rows = [f"  {'stage':<20s}{'peak':>12s}   largest terms"]
        for st in STAGES:
            big = sorted(self.terms[st].items(), key=lambda kv: -kv[1])[:3]
            desc = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in big)
            rows.append(f"  {st:<20s}{fmt_bytes(self.peak[st]):>12s}   {desc}")
        rows.append("  stored: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.stored.items()))
        streamed = self.terms["cached scoring"].get("streamed (over the disk budget)", 0)
        rows.append(f"  disk (gradient cache, {o.n_candidates} documents): "
                    + (f"none, streamed (over {o.gradient_cache_gb:g} GB)" if streamed
                       else f"{self.disk / 1e9:.3g} GB"))  # fmt: skip
        return head + "\n".join(rows)


def _config_of(model_config_or_model):
    return (model_config_or_model.config if isinstance(model_config_or_model, nn.Module)
            else model_config_or_model)  # fmt: skip


@dataclass(frozen=True)
class _Sizes:
    """The byte counts every stage's terms are built from (`predict`)."""

    s: ModelShape
    o: MemoryOptions
    e: int  # bytes per factor element
    g_e: int  # bytes per gradient element
    act_fit: ActivationModel
    act_score: ActivationModel

    def kept(self, b: int, t: int, layers: Layers, el: int | None = None) -> int:
        return sum(b * t * (d + out) * (el or self.e) for _, d, out in layers)

    def act(self, x: BatchShape, layers: Layers, fitting: bool = True) -> int:
        """act(B, T) of batch x with the captures of `layers` (a partition's own), + padding."""
        model, el = (self.act_fit, self.e) if fitting else (self.act_score, self.g_e)
        padded = x.padded or (self.o.padded and self.o.lengths is None)
        pad = sum(x.b * x.t * out * el for _, _, out in layers) if padded else 0
        swap = self.kept(x.b, x.t, layers, el) - self.kept(x.b, x.t, self.s.layers, el)
        return int(model(x.b, x.t, self.s.n_layers) + swap + pad)

    def queries(self, q: int) -> BatchShape:
        return BatchShape(q, self.o.query_len, q * self.o.query_len)


def predict(model_config_or_model, options: MemoryOptions | None = None,
            device: torch.device | str | None = None, *,
            lengths: Sequence[int] | None = None, progress: bool = True) -> MemoryPlan:  # fmt: skip
    """A `MemoryPlan` from the model's config (or the model) and the options, for `device`
    (default msif_lite.device(); offload changes nothing on a CPU, where the "device" is the
    CPU memory itself). `lengths`: the corpus's document lengths in batching order (as
    `MemoryOptions.lengths`): the plan then uses the batches the run forms, not the longest
    document. See the module docstring for each formula; the activation terms are measured on
    shrunken copies of the model (`activation_model`, a few seconds, cached; a progress bar
    after 2 s unless `progress=False`)."""
    from msif_lite.config import device as default_device

    opts = options if options is not None else MemoryOptions()
    if lengths is not None:
        opts = replace(opts, lengths=tuple(int(n) for n in lengths))
    o = opts
    dev = torch.device(device) if device is not None else default_device()
    s = ModelShape.of(model_config_or_model, o)
    if dev.type == "cpu" and o.offload:
        o = replace(o, offload=False)
    if o.eigh_workers is None:  # as fit_eigenbasis resolves it
        o = replace(o, eigh_workers=torch.get_num_threads() if dev.type == "cpu" else 1)
    wdt = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[s.grad_bytes]
    if isinstance(model_config_or_model, nn.Module):
        wdt = next(model_config_or_model.parameters()).dtype
    e = 8 if o.factor_dtype_for(wdt) == "float64" else 4
    config = _config_of(model_config_or_model)
    c = _Sizes(s, o, e, s.grad_bytes,
               activation_model(config, o, fitting=True, weight_dtype=wdt, progress=progress),
               activation_model(config, o, fitting=False, weight_dtype=wdt, progress=progress))
    peaks, terms = _fit_terms(c)
    factors = sum((d * d + out * out + d * out) * e for _, d, out in s.layers)
    on_device = 0 if o.offload else o.stages * factors
    terms["scoring"], q_store = _scoring_terms(c)
    terms["cached scoring"], disk = _cached_scoring_terms(c)
    for st in ("scoring", "cached scoring"):
        terms[st] = {"factors on device": on_device, **terms[st]}
        peaks[st] = on_device + max(v for k, v in terms[st].items() if k != "factors on device")
    P = sum(d * out for _, d, out in s.layers)
    stored = {"A,S": factors - P * e, "eigenbases": factors - P * e, "Λ": P * e,
              "EK-FAC per stage": factors, "queries": q_store}
    return MemoryPlan(s, opts, {k: int(peaks[k]) for k in STAGES},
                      stored, terms, disk, {"fitting": c.act_fit, "scoring": c.act_score})


def _cache_states(per: list[int], cached: list[int], budget: float) -> tuple[list[int], bool]:
    """Capture bytes alive before each batch of the covariance pass (`fit_covariances`): the
    cached batches (`cached`: their bytes as kept, e.g. bf16 copies of `per`) while all so
    far fit in `budget`, plus the previous batch's own captures (still bound to the loop
    variable) when the cache holds copies; else the previous batch's; and whether the whole
    pass stayed cached (Λ reuses it)."""
    before, used, caching = [], 0, budget > 0
    for i in range(len(per)):
        prev = per[i - 1] if i else 0
        copies = bool(i) and cached[i - 1] != per[i - 1]
        before.append(used + (prev if copies else 0) if caching else prev)
        used += cached[i]
        caching = caching and used <= budget
    return before, caching


def _fit_terms(c: _Sizes) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Covariance, eigendecomposition and Λ peaks, each group of layers after another."""
    o, e = c.o, c.e
    batches = o.fit_batches()
    peaks = dict.fromkeys(STAGES, 0)
    terms: dict[str, dict[str, int]] = {st: {} for st in STAGES}
    done = 0  # stored factors of earlier groups still on the device
    for g in _groups(c.s.layers, o.partitions):
        as_b = sum((d * d + out * out) * e for _, d, out in g)
        lam_b = sum(d * out * e for _, d, out in g)
        per = [c.kept(x.b, x.t, g) for x in batches]
        ce = 2 if o.cache_dtype == "bfloat16" else e  # bytes per cached element
        cached = [c.kept(x.b, x.t, g, ce) for x in batches]
        acts = [c.act(x, g) for x in batches]
        before, fits = _cache_states(per, cached, o.cache_activations_mb * 2**20)
        i = max(range(len(batches)), key=lambda j: before[j] + acts[j])
        cache_all = sum(cached) if fits else 0
        cov = {"A,S": as_b, "cached/previous batches": before[i], "forward+backward": acts[i],
               "earlier groups": done}
        eig = {"A,S": 0 if o.offload else as_b, "cached batches": cache_all,
               "eigh + bases so far": _eigh_peak(c, g), "earlier groups": done}
        back = 2 if ce != e else 1  # a cache in another dtype is converted back first
        rot = [max(x.b * (back * x.t * (d + out) + 2 * out * d) * e for _, d, out in g)
               for x in batches]  # fmt: skip
        rotations = max(rot) if fits else max(
            (per[j - 1] if j else 0) + max(acts[j], per[j] + rot[j]) for j in range(len(per)))
        lam = {"eigenbases": as_b, "Λ": lam_b, "cached batches": cache_all,
               "rotations": rotations, "earlier groups": done}
        for st, t in (("covariance", cov), ("eigendecomposition", eig), ("lambda", lam)):
            if sum(t.values()) > peaks[st]:
                peaks[st], terms[st] = sum(t.values()), t
        done += 0 if o.offload else as_b + lam_b
    return peaks, terms


def _eigh_peak(c: _Sizes, g: Layers) -> int:
    """Bases so far + the eigh workspaces of the `eigh_workers` layers in flight."""
    e, w = c.e, c.o.eigh_workers or 1  # `predict` resolves None for its device
    E = 8 if c.o.eigh_dtype == "float64" else 4
    k = 3 * E + (0 if e == E else E)  # + the copy in eigh_dtype
    ws = [max(k * d * d, E * d * d + k * out * out) for _, d, out in g]
    peak, q_so_far = 0, 0
    for i, (_, d, out) in enumerate(g):
        in_flight = ws[i] + sum(sorted(ws[i + 1:], reverse=True)[: w - 1])
        peak = max(peak, q_so_far + in_flight)
        q_so_far += (d * d + out * out) * e
    return peak


def _svd_bytes(d: int, out: int, q: int, g_e: int) -> int:
    """Truncating one layer's (Q, o, d_in) P: P, the SVD's copy, U, Vᵀ and its 4k² work."""
    k = min(d, out)
    return (2 * d * out + k * (d + out) + 4 * k * k) * q * g_e


def _layerwise_preconditioning(c: _Sizes) -> int:
    """Peak of `engine.scores.preconditioned_queries` over its layer loop: the kept query
    captures kept(Q, T_q) + the results kept so far + one layer's temporaries
    ((4 + S)·Q·o·d_in·g for the inverse's rotations, or the SVD's with rank r)."""
    s, o, g_e = c.s, c.o, c.g_e
    Q, r, S = o.n_queries, o.query_rank, o.stages
    caps = c.kept(Q, o.query_len, s.layers, g_e)
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


def _candidates(c: _Sizes, per_batch) -> int:
    """max over the candidate batches x of act(x) + per_batch(x)."""
    return max(c.act(x, c.s.layers, False) + per_batch(x) for x in c.o.candidate_batches())


def _query_phases(c: _Sizes, inv: int = 0) -> dict[str, int]:
    Q, Qb = c.o.n_queries, min(c.o.n_queries, 16)
    L = c.s.layers
    return {"query captures": inv + c.act(c.queries(Qb), L, False)
            + c.kept(Q - Qb, c.o.query_len, L, c.g_e),
            "preconditioning, layer by layer": inv + _layerwise_preconditioning(c)}


def _scoring_terms(c: _Sizes) -> tuple[dict[str, int], int]:
    """The phases of `pairwise_scores` (module docstring); returns them and the kept queries."""
    o, g_e = c.o, c.g_e
    Q, r = o.n_queries, o.query_rank
    od = max(d * out for _, d, out in c.s.layers)
    q_store = _kept_queries(c.s, o, g_e)
    cand = q_store + _candidates(
        c, lambda x: 3 * Q * x.b * x.t * r * g_e if r else x.b * od * g_e)
    return {**_query_phases(c), "candidate batch + kept queries": cand}, q_store


def _cached_scoring_terms(c: _Sizes) -> tuple[dict[str, int], int]:
    """The phases of `Attributor.scores` (a gradient method, `GradientMethod.layer_scores`)
    with the GradientStore; returns them and the disk (module docstring)."""
    o, s, g_e = c.o, c.s, c.g_e
    P = sum(d * out for _, d, out in s.layers)
    Q, r, S = o.n_queries, o.query_rank, o.stages
    od = max(d * out for _, d, out in s.layers)
    if o.projection:
        k_in, k_out = o.projection
        P_store = sum(min(k_in, d) * min(k_out, out) for _, d, out in s.layers)
    else:
        P_store = P
    per_doc = P_store * g_e
    disk = stored_bytes(c, per_doc)
    streams = disk > o.gradient_cache_gb * 1e9
    q_store = _kept_queries(s, o, g_e)
    # the method's inverse, built for this call: D_l + λ_l of each stage (P·e each) and, for
    # two stages, H_ft = c·G_ft's rescaled Λ (P·e); freed once the queries are preconditioned
    out = _query_phases(c, (S + (1 if S == 2 else 0)) * P * c.e)
    q_proj = Q * P_store * g_e if o.projection else 0  # projected queries Π P Πᵀ
    if streams and not o.projection:  # engine.scores.pairwise_scores, one layer at a time
        out["streamed (over the disk budget)"] = q_store + _candidates(
            c, lambda x: 3 * Q * x.b * x.t * r * g_e if r else x.b * od * g_e)
        return out, 0
    if streams:  # projected batches: DW of all layers, whitened and projected
        out["streamed (over the disk budget)"] = q_store + q_proj + _candidates(
            c, lambda x: x.b * P * g_e)  # a batch's DW of all layers
        return out, 0
    n = min(o.n_candidates, max(1, int(o.chunk_mb * 2**20 // per_doc)))
    dense = not o.projection and not all(token_form(c))  # one layer's L R with rank r
    dense_layer = Q * od * g_e if r and dense else 0
    out["candidate chunk"] = q_store + q_proj + dense_layer + stored_chunk(c, n, per_doc, P)
    return out, disk


"""K-FAC covariances, their eigenbases and the EK-FAC eigenvalue correction.

Notebook 03 §The Fisher block: per tracked layer,

    A = (1/N_tok) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ          (d_in, d_in), averaged over real tokens
    S = (1/N_seq) Σ_n Σ_t Ds_{n,t} Ds_{n,t}ᵀ        (out, out), token-summed per sequence,
                                                     averaged over sequences
    G_layer ≈ A ⊗ S     (in the kit's row-major `flatten`: torch.kron(S, A))

With one token per example A ⊗ S is exactly the Fisher block of a linear model; with T
tokens per sequence S carries the per-sequence scale of DW_n = Σ_t Ds_t ā_tᵀ.

Notebook 04 §The eigenbasis: A = Q_A Λ_A Q_Aᵀ, S = Q_S Λ_S Q_Sᵀ (float64 eigh) and

    Λ = (1/N_seq) Σ_n (Q_Sᵀ DW_n Q_A)^⊙2                (out, d_in)

computed from rotated tokens (Q_Aᵀ ā, Q_Sᵀ Ds) and one einsum per layer. When the captured
(ā, Ds) of the covariance pass fit in `cache_activations_mb`, the Λ pass reuses them instead
of a second forward + backward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.capture import BatchCapture, capture_batch
from msif_lite.engine.layers import DEFAULT_EXCLUDE, TrackedModule, find_modules
from msif_lite.engine.storage import (
    ArtifactKey,
    config_fingerprint,
    load_artifact,
    model_fingerprint,
    save_artifact,
)
from msif_lite.engine.tasks import Fisher, Task


def _help(text: str, default):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class FactorConfig:
    """Settings of a factor fit (frozen, validated; `FactorConfig.help()` prints the fields)."""

    fisher: Fisher = _help(
        "'sampled': labels drawn from the model (true Fisher = GGN for softmax CE); "
        "'empirical': the data labels (empirical Fisher).", "sampled")
    seed: int = _help("seed of the torch.Generator that draws sampled labels", 0)
    include: str | tuple[str, ...] | None = _help(
        "regexes of layers to track (None: every linear layer); 'mlp'/'attention' shortcuts",
        None)
    exclude: str | tuple[str, ...] | None = _help(
        "regexes of layers never tracked (default: the unembedding)", DEFAULT_EXCLUDE)
    max_batches: int | None = _help("stop each pass after this many batches (None: all)", None)
    factor_dtype: Literal["float32", "float64", "auto"] = _help(
        "dtype of the accumulated factors; 'auto' = the model's dtype, float32 for 16-bit "
        "models (eigendecompositions always run in float64)", "auto")
    progress: bool = _help("show tqdm progress bars", True)
    cache_activations_mb: float = _help(
        "memory budget (MiB) for keeping the covariance pass's (ā, Ds) to reuse in the Λ pass; "
        "0 always recomputes them", 2048.0)
    autocast_dtype: Literal["bfloat16", "float16"] | None = _help(
        "run the forward/backward passes under torch.autocast in this dtype (None: off); the "
        "captured (ā, Ds) and the factors stay in factor_dtype, eigh in float64", None)
    max_tokens: int | None = _help(
        "token budget of each pass: stop before the batch after the one that reaches it "
        "(counted with task.token_mask; None: no budget)", None)
    offload: bool = _help(
        "keep finished factors in CPU memory: A, S after the covariance pass; each layer's "
        "eigh on the model's device then back; Λ stored on the CPU (scoring moves a layer "
        "to the device only while applying it)", False)

    # fields added later: left out of `settings` at their defaults (old fingerprints hold)
    _NEW_FIELDS: ClassVar[dict] = {"autocast_dtype": None, "max_tokens": None}

    def __post_init__(self) -> None:
        if self.fisher not in ("sampled", "empirical"):
            raise ValueError(f"fisher must be 'sampled' or 'empirical', got {self.fisher!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.max_batches is not None and not (isinstance(self.max_batches, int)
                                                 and self.max_batches >= 1):
            raise ValueError(f"max_batches must be None or an int >= 1, not {self.max_batches!r}")
        if self.factor_dtype not in ("float32", "float64", "auto"):
            raise ValueError(
                f"factor_dtype must be 'float32', 'float64' or 'auto', got {self.factor_dtype!r}"
            )
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError("autocast_dtype must be None, 'bfloat16' or 'float16', "
                             f"got {self.autocast_dtype!r}")
        if self.max_tokens is not None and not (isinstance(self.max_tokens, int)
                                                and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be None or an int >= 1, not {self.max_tokens!r}")
        if not self.cache_activations_mb >= 0:
            raise ValueError(f"cache_activations_mb must be >= 0, got {self.cache_activations_mb}")
        for name in ("include", "exclude"):  # lists → tuples, so the config stays hashable
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"{f.name}: {f.metadata.get('help', '')}" for f in dataclasses.fields(cls))

    def settings(self, module_names: Sequence[str]) -> str:
        """Fingerprint of what changes the factors' values (not progress bars or cache size)."""
        d = dataclasses.asdict(self)
        d.pop("progress")
        d.pop("cache_activations_mb")
        d.pop("offload")
        for k, default in self._NEW_FIELDS.items():
            if d[k] == default:
                d.pop(k)
        d["modules"] = list(module_names)
        return config_fingerprint(d)

    def dtype_for(self, model: nn.Module) -> torch.dtype:
        if self.factor_dtype != "auto":
            return getattr(torch, self.factor_dtype)
        p = next(model.parameters())
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


@dataclass(frozen=True)
class FitTimings:
    """Wall-clock seconds per fitting stage (NaN for a stage that did not run)."""

    covariance_s: float = float("nan")
    eigendecomposition_s: float = float("nan")
    lambda_s: float = float("nan")


@dataclass(frozen=True)
class KroneckerFactors:
    """One layer's K-FAC factors: A (d_in, d_in) and S (out, out)."""

    name: str
    A: torch.Tensor
    S: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.S.shape[0], self.A.shape[0])


@dataclass(frozen=True)
class EigenFactors:
    """One layer's eigenbases A = Q_A diag(eig_A) Q_Aᵀ, S = Q_S diag(eig_S) Q_Sᵀ and the
    EK-FAC eigenvalues `lam` (out, d_in), None until `fit_lambda` runs."""

    name: str
    q_a: torch.Tensor
    eig_a: torch.Tensor
    q_s: torch.Tensor
    eig_s: torch.Tensor
    lam: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_s.shape[0], self.q_a.shape[0])

    def A(self) -> torch.Tensor:
        return (self.q_a * self.eig_a) @ self.q_a.T

    def S(self) -> torch.Tensor:
        return (self.q_s * self.eig_s) @ self.q_s.T


@dataclass(frozen=True)
class _Factors:
    """Shared record keeping and storage of KFACFactors / EKFACFactors."""

    layers: tuple
    fisher: Fisher
    n_sequences: int
    n_tokens: int
    config: FactorConfig
    timings: FitTimings = FitTimings()
    _KIND: ClassVar[str] = ""
    _TENSORS: ClassVar[tuple[str, ...]] = ()

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.layers)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple(x.shape for x in self.layers)

    def layer(self, name: str):
        for x in self.layers:
            if x.name == name:
                return x
        raise KeyError(f"no factors for layer {name!r}; fitted layers: {self.module_names}")

    # ------------------------------------------------------------------ storage
    @classmethod
    def _key(cls, model, names, config: FactorConfig, data_fingerprint: str) -> ArtifactKey:
        fp = model_fingerprint(model)  # every weight and buffer, tracked or not
        return ArtifactKey(cls._KIND, fp, data_fingerprint, config.settings(names))

    def save(self, path: str | Path, model: nn.Module, data_fingerprint: str) -> Path:
        """Write the factors, keyed by the whole model (all weights and buffers), the data
        and the config."""
        tensors = {}
        for x in self.layers:
            for t in self._TENSORS:
                value = getattr(x, t)
                if value is not None:
                    tensors[f"{x.name}/{t}"] = value
        meta = {
            "fisher": self.fisher, "n_sequences": self.n_sequences, "n_tokens": self.n_tokens,
            "config": dataclasses.asdict(self.config), "timings": dataclasses.asdict(self.timings),
            "modules": list(self.module_names),
        }
        key = self._key(model, self.module_names, self.config, data_fingerprint)
        return save_artifact(path, tensors, key, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        expect_config: FactorConfig,
        data_fingerprint: str,
        modules: Sequence[TrackedModule] | None = None,
    ):
        """Load factors, refusing (StaleArtifactError) ones fitted on another model, data or
        settings than `model`, `data_fingerprint` and `expect_config` describe."""
        if modules is None:
            modules = find_modules(model, expect_config.include, expect_config.exclude)
        names = [m.name for m in modules]
        tensors, meta = load_artifact(path, cls._key(model, names, expect_config, data_fingerprint))
        layers = []
        for n in names:
            kw = {t: tensors.get(f"{n}/{t}") for t in cls._TENSORS}
            layers.append(cls._LAYER(n, **kw))
        timings = FitTimings(**meta["timings"])
        return cls(tuple(layers), meta["fisher"], meta["n_sequences"], meta["n_tokens"],
                   expect_config, timings)


@dataclass(frozen=True)
class KFACFactors(_Factors):
    """K-FAC factors of all tracked layers (Notebook 03 §The Fisher block)."""

    layers: tuple[KroneckerFactors, ...]
    _KIND: ClassVar[str] = "kfac_factors"
    _TENSORS: ClassVar[tuple[str, ...]] = ("A", "S")
    _LAYER: ClassVar[type] = KroneckerFactors


@dataclass(frozen=True)
class EKFACFactors(_Factors):
    """Eigenbases (+ EK-FAC eigenvalues once fitted) of all tracked layers (Notebook 04)."""

    layers: tuple[EigenFactors, ...]
    _KIND: ClassVar[str] = "ekfac_factors"
    _TENSORS: ClassVar[tuple[str, ...]] = ("q_a", "eig_a", "q_s", "eig_s", "lam")
    _LAYER: ClassVar[type] = EigenFactors

    @property
    def has_lambda(self) -> bool:
        return all(x.lam is not None for x in self.layers)

    def to(self, dtype: torch.dtype) -> EKFACFactors:
        """The same factors in `dtype` (float64 keeps a tiny damping λ invertible)."""
        def cast(t):
            return None if t is None else t.to(dtype)

        layers = tuple(EigenFactors(x.name, cast(x.q_a), cast(x.eig_a), cast(x.q_s),
                                    cast(x.eig_s), cast(x.lam)) for x in self.layers)
        return dataclasses.replace(self, layers=layers)


def _check(name: str, what: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(
            f"{what} of layer {name!r} contains NaN or inf. Fix the data or model (check that "
            "the loss is finite on every batch; use float32/bf16 instead of fp16), or exclude "
            "the layer with FactorConfig(exclude=...)."
        )


def _batches(loader: Iterable, config: FactorConfig, desc: str, task: Task | None = None):
    """The batches of one pass: at most config.max_batches, and none after the batch that
    brings the real-token count (task.token_mask) to config.max_tokens."""
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if config.max_batches is not None and total is not None:
        total = min(total, config.max_batches)
    seen = 0
    for i, batch in enumerate(tqdm(loader, desc=desc, total=total, disable=not config.progress)):
        if config.max_batches is not None and i >= config.max_batches:
            break
        if config.max_tokens is not None and seen >= config.max_tokens:
            break
        if config.max_tokens is not None and task is not None:
            mask = task.token_mask(batch)
            seen += task.batch_size(batch) if mask is None else int(mask.sum())
        yield batch


def _autocast(config: FactorConfig, model: nn.Module):
    """torch.autocast(<model's device type>, config.autocast_dtype), or nothing."""
    if config.autocast_dtype is None:
        return contextlib.nullcontext()
    dev = next(model.parameters()).device.type
    return torch.autocast(dev, dtype=getattr(torch, config.autocast_dtype))


def _generators(config: FactorConfig, batch_seeds: Sequence[int] | None):
    """Generator for the j-th batch: one stream seeded with config.seed (default), or, with
    `batch_seeds`, a fresh torch.Generator().manual_seed(batch_seeds[j]) per batch, so the
    draws of a batch do not depend on which batches precede it (sharding across processes)."""
    gen = torch.Generator().manual_seed(config.seed)
    j = 0
    while True:
        yield gen if batch_seeds is None else torch.Generator().manual_seed(batch_seeds[j])
        j += 1


def _modules(model, config, modules):
    return list(modules) if modules is not None else find_modules(
        model, config.include, config.exclude)


def fit_covariances(
    model: nn.Module,
    task: Task,
    loader: Iterable,
    config: FactorConfig = FactorConfig(),
    modules: Sequence[TrackedModule] | None = None,
    *,
    cache: list[BatchCapture] | None = None,
    batch_seeds: Sequence[int] | None = None,
) -> KFACFactors:
    """A = (1/N_tok) Σ ā āᵀ, S = (1/N_seq) Σ_n Σ_t Ds Dsᵀ over `loader` (Notebook 03
    §The Fisher block). Sampled labels come from torch.Generator().manual_seed(config.seed).

    `cache`: a list to append each batch's captures to while they fit in
    config.cache_activations_mb (it is cleared if they do not), for `fit_lambda` to reuse.
    `batch_seeds`: seed of each batch's own label generator instead of the config.seed stream
    (used by msif_lite.engine.distributed so that sampled labels do not depend on the sharding).
    """
    t0 = time.perf_counter()
    modules = _modules(model, config, modules)
    dtype = config.dtype_for(model)
    gens = _generators(config, batch_seeds)
    a_sum = [None] * len(modules)
    s_sum = [None] * len(modules)
    n_seq = n_tok = 0
    budget = config.cache_activations_mb * 2**20
    used, caching = 0, cache is not None and budget > 0
    for batch in _batches(loader, config, "covariances", task):
        with _autocast(config, model):
            cap = capture_batch(model, task, batch, modules, fisher=config.fisher,
                                generator=next(gens), dtype=dtype)
        n_seq += cap.n_sequences
        n_tok += cap.n_tokens
        for i, x in enumerate(cap.layers):
            a, ds = x.a.reshape(-1, x.a.shape[-1]), x.ds.reshape(-1, x.ds.shape[-1])
            a_sum[i] = a.T @ a if a_sum[i] is None else a_sum[i].addmm_(a.T, a)
            s_sum[i] = ds.T @ ds if s_sum[i] is None else s_sum[i].addmm_(ds.T, ds)
        if caching:
            used += cap.nbytes()
            if used <= budget:
                cache.append(cap)
            else:
                cache.clear()
                caching = False
    if n_seq == 0:
        raise ValueError("the data loader yielded no batches; factors need at least one example.")
    layers = []
    for m, a, s in zip(modules, a_sum, s_sum):
        A, S = a / max(n_tok, 1), s / n_seq
        _check(m.name, "covariance A", A)
        _check(m.name, "covariance S", S)
        if config.offload:
            A, S = A.cpu(), S.cpu()
        layers.append(KroneckerFactors(m.name, A, S))
    timings = FitTimings(covariance_s=time.perf_counter() - t0)
    return KFACFactors(tuple(layers), config.fisher, n_seq, n_tok, config, timings)


def fit_eigenbasis(kfac: KFACFactors, device: torch.device | str | None = None) -> EKFACFactors:
    """A = Q_A diag(eig_A) Q_Aᵀ, S = Q_S diag(eig_S) Q_Sᵀ by float64 `eigh` (Notebook 04
    §Eigenbasis); round-off negative eigenvalues are clamped to 0. Stored in the factor dtype.
    `device`: where to run each eigh (default: where the factors are); with config.offload
    the results go back to the CPU one layer at a time."""
    t0 = time.perf_counter()
    layers = []
    threads = torch.get_num_threads()
    offload = kfac.config.offload
    for x in kfac.layers:
        if device is not None:
            x = KroneckerFactors(x.name, x.A.to(device), x.S.to(device))
        # CPU eigh of these (≤ few-k) matrices gains little from threads but suffers badly
        # from OpenMP oversubscription on a busy machine (10x seen): run it on one thread.
        if x.A.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            ea, qa = torch.linalg.eigh(x.A.double())
            es, qs = torch.linalg.eigh(x.S.double())
        finally:
            torch.set_num_threads(threads)
        dt = x.A.dtype
        out = [qa.to(dt), ea.clamp_min(0).to(dt), qs.to(dt), es.clamp_min(0).to(dt)]
        del ea, qa, es, qs
        if offload:
            out = [t.cpu() for t in out]
        layers.append(EigenFactors(x.name, *out))
    timings = dataclasses.replace(kfac.timings, eigendecomposition_s=time.perf_counter() - t0)
    return EKFACFactors(tuple(layers), kfac.fisher, kfac.n_sequences, kfac.n_tokens,
                        kfac.config, timings)


def fit_lambda(
    model: nn.Module,
    task: Task,
    loader: Iterable,
    factors: EKFACFactors,
    config: FactorConfig | None = None,
    modules: Sequence[TrackedModule] | None = None,
    *,
    cache: Sequence[BatchCapture] | None = None,
    batch_seeds: Sequence[int] | None = None,
) -> EKFACFactors:
    """Λ = (1/N_seq) Σ_n (Q_Sᵀ DW_n Q_A)^⊙2, from rotated tokens ã = Q_Aᵀā, d̃s = Q_SᵀDs:
    Q_Sᵀ DW_n Q_A = Σ_t d̃s_t ã_tᵀ (Notebook 04 §The eigenbasis). Uses `cache` (the
    covariance pass's captures) when given and non-empty, else one more pass over `loader`
    with the same seeded labels (the same `batch_seeds` as `fit_covariances`, if any)."""
    t0 = time.perf_counter()
    config = config or factors.config
    names = factors.module_names
    if modules is None:
        by_name = {m.name: m for m in find_modules(model, None, None)}
        modules = [by_name[n] for n in names]
    dtype = factors.layers[0].q_a.dtype
    gens = _generators(config, batch_seeds)
    sums = [torch.zeros(x.shape, dtype=dtype) for x in factors.layers]
    n_seq = 0

    def recompute():
        for b, g in zip(_batches(loader, config, "eigenvalue correction", task), gens):
            with _autocast(config, model):
                yield capture_batch(model, task, b, modules, fisher=config.fisher, generator=g,
                                    dtype=dtype)

    source = cache if cache else recompute()
    bases = [(f.q_s, f.q_a) for f in factors.layers]
    if config.offload:  # the bases visit the model's device for this pass only
        dev = next(model.parameters()).device
        bases = [(qs.to(dev), qa.to(dev)) for qs, qa in bases]
    if cache:
        source = tqdm(cache, desc="eigenvalue correction (cached)", disable=not config.progress)
    for cap in source:
        n_seq += cap.n_sequences
        for i, (x, (q_s, q_a)) in enumerate(zip(cap.layers, bases)):
            rot = torch.bmm((x.ds @ q_s).transpose(1, 2), x.a @ q_a)  # Q_Sᵀ DW_n Q_A
            sums[i] = sums[i].to(rot.device).add_(rot.square().sum(0))
    if n_seq == 0:
        raise ValueError("the data loader yielded no batches; Λ needs at least one example.")
    layers = []
    for f, s in zip(factors.layers, sums):
        lam = s / n_seq
        _check(f.name, "EK-FAC eigenvalues Λ", lam)
        if config.offload:
            lam = lam.cpu()
        layers.append(dataclasses.replace(f, lam=lam))
    timings = dataclasses.replace(factors.timings, lambda_s=time.perf_counter() - t0)
    return EKFACFactors(tuple(layers), factors.fisher, factors.n_sequences, factors.n_tokens,
                        factors.config, timings)


def fit_ekfac(
    model: nn.Module,
    task: Task,
    loader: Iterable,
    config: FactorConfig = FactorConfig(),
    modules: Sequence[TrackedModule] | None = None,
    *,
    batch_seeds: Sequence[int] | None = None,
) -> EKFACFactors:
    """Covariances → eigenbases → Λ (Notebooks 03–04), timing each stage in `.timings`.
    `batch_seeds`: per-batch label seeds (see `fit_covariances`; default: one stream)."""
    modules = _modules(model, config, modules)
    cache: list[BatchCapture] = []
    kfac = fit_covariances(model, task, loader, config, modules, cache=cache,
                           batch_seeds=batch_seeds)
    eig = fit_eigenbasis(kfac, next(model.parameters()).device if config.offload else None)
    del kfac  # A and S are not needed once the eigenbases exist
    out = fit_lambda(model, task, loader, eig, config, modules, cache=cache,
                     batch_seeds=batch_seeds)
    cache.clear()
    return out

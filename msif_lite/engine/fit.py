"""Fitting the factors of `engine.factors` from data: the covariance pass (A, S), the
eigendecompositions, and the EK-FAC eigenvalue pass (Λ); `fit_ekfac` runs all three.

The covariances are derived in notebook 03 §The Fisher block; the eigenvalue correction in
notebook 04 §The eigenbasis; the equations are in `engine.factors`' docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.capture import BatchCapture, capture_batch
from msif_lite.engine.factors import (
    EigenFactors,
    EKFACFactors,
    FactorConfig,
    FitTimings,
    KFACFactors,
    KroneckerFactors,
)
from msif_lite.engine.layers import TrackedModule, find_modules
from msif_lite.engine.tasks import Task


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
    config: FactorConfig = FactorConfig(),  # noqa: B008 (frozen, immutable)
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
            kept = cap if config.cache_dtype is None else cap.to(getattr(torch,
                                                                         config.cache_dtype))
            used += kept.nbytes()
            if used <= budget:
                cache.append(kept)
            else:
                cache.clear()
                caching = False
            del kept
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


def _eigh(x: KroneckerFactors, dtype: torch.dtype, offload: bool,
          device: torch.device | str | None = None) -> EigenFactors:  # fmt: skip
    """One layer: A = Q_A diag(d_A) Q_Aᵀ, S = Q_S diag(d_S) Q_Sᵀ by `eigh` in `dtype` (on
    `device` when given), round-off negative eigenvalues clamped to 0, in the factor dtype."""
    ea, qa = torch.linalg.eigh(x.A.to(device, dtype))
    es, qs = torch.linalg.eigh(x.S.to(device, dtype))
    dt = x.A.dtype
    out = [qa.to(dt), ea.clamp_min(0).to(dt), qs.to(dt), es.clamp_min(0).to(dt)]
    if offload:
        out = [t.cpu() for t in out]
    return EigenFactors(x.name, *out)


def fit_eigenbasis(kfac: KFACFactors, device: torch.device | str | None = None) -> EKFACFactors:
    """A = Q_A diag(d_A) Q_Aᵀ, S = Q_S diag(d_S) Q_Sᵀ per layer (Notebook 04 §The eigenbasis), by
    `eigh` in `config.eigh_dtype` (float64 by default), stored in the factor dtype.
    `device`: where to run each eigh (default: where the factors are); with config.offload
    the results go back to the CPU one layer at a time.

    On a CPU, `config.eigh_workers` layers (default: one per torch thread) are decomposed at
    once, each on one thread: eigh of these (≤ few-k) matrices gains little from threads
    inside one call and suffers badly from OpenMP oversubscription on a busy machine (10x
    seen), while independent layers on separate threads scale; the results are the same."""
    t0 = time.perf_counter()
    cfg, threads = kfac.config, torch.get_num_threads()
    dtype = getattr(torch, cfg.eigh_dtype)
    layers = kfac.layers
    on_cpu = torch.device(device or layers[0].A.device).type == "cpu"
    workers = cfg.eigh_workers or (threads if on_cpu else 1)
    bar = tqdm(total=len(layers), desc="eigendecomposition (per layer)",
               disable=not cfg.progress, delay=2.0)  # fmt: skip

    def one(x: KroneckerFactors) -> EigenFactors:
        if on_cpu:
            torch.set_num_threads(1)  # this thread's own setting (a worker's or ours)
        return _eigh(x, dtype, cfg.offload, device)

    out: list[EigenFactors] = []
    try:
        if workers == 1:
            for x in layers:
                out.append(one(x))
                bar.update()
        else:
            with ThreadPoolExecutor(min(workers, len(layers))) as pool:
                for f in pool.map(one, layers):  # in layer order
                    out.append(f)
                    bar.update()
    finally:
        torch.set_num_threads(threads)
        bar.close()
    timings = dataclasses.replace(kfac.timings, eigendecomposition_s=time.perf_counter() - t0)
    return EKFACFactors(tuple(out), kfac.fisher, kfac.n_sequences, kfac.n_tokens,
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
            a, ds = x.a.to(q_a.dtype), x.ds.to(q_s.dtype)  # a bf16 cache back to the factors'
            rot = torch.bmm((ds @ q_s).transpose(1, 2), a @ q_a)  # Q_Sᵀ DW_n Q_A
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
    config: FactorConfig = FactorConfig(),  # noqa: B008 (frozen, immutable)
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

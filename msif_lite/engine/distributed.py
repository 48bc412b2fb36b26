"""Data-parallel EK-FAC fitting and sharded pairwise scoring with `torch.distributed`.

Launch with `torchrun --nproc_per_node=W script.py` and `dist.init_process_group("gloo")`
(CPU) or "nccl" (GPUs). Every rank passes the *same* model, config and list of batches and
processes only its contiguous shard B_r of the batches. Per layer the ranks all-reduce
un-normalised sums, so that

    A = Σ_r Σ_{(n,t)∈B_r} ā āᵀ / Σ_r N_tok,r        S = Σ_r Σ_{n∈B_r} Σ_t Ds Dsᵀ / Σ_r N_seq,r
    Λ = Σ_r Σ_{n∈B_r} (Q_Sᵀ DW_n Q_A)^⊙2 / Σ_r N_seq,r

equal the one-process factors up to the order of floating-point summation. The eigenbases
are broadcast from rank 0, so every rank rotates with, and returns, the same Q_A, Q_S.

Sampled Fisher: the labels of global batch i are drawn by
torch.Generator().manual_seed(batch_seed(config.seed, i)), independent of the sharding; so
the factors equal `fit_ekfac(..., batch_seeds=[batch_seed(config.seed, i) for i ...])` for
any number of ranks (a different, equally valid draw than plain `fit_ekfac`'s one stream).
A rank with an empty shard (more ranks than batches) still joins every collective with zeros.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from msif_lite.engine.capture import BatchCapture
from msif_lite.engine.factors import (
    EigenFactors,
    EKFACFactors,
    FactorConfig,
    KFACFactors,
    KroneckerFactors,
)
from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_ekfac, fit_lambda
from msif_lite.engine.ihvp import InverseHVP
from msif_lite.engine.layers import TrackedModule, find_modules
from msif_lite.engine.scores import pairwise_scores, precondition, query_gradients
from msif_lite.engine.tasks import Task

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous balanced split of range(n): rank r gets [⌊rn/W⌋, ⌊(r+1)n/W⌋), possibly
    empty; concatenating the ranges in rank order gives range(n) back."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of `rank` under `shard_range` (deterministic; the same on every call)."""
    return [items[i] for i in shard_range(len(items), rank, world_size)]


def batch_seed(seed: int, index: int) -> int:
    """Seed of global batch `index`'s label generator: a 63-bit hash of (seed, index)."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_same(**values) -> None:
    """all_gather_object the values of every rank; raise on every rank if any differs from
    rank 0's (all ranks raise together, so none is left waiting in a collective)."""
    _, world = rank_and_world()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, values)
    for key in values:
        bad = [r for r, v in enumerate(gathered) if v[key] != gathered[0][key]]
        if bad:
            raise ValueError(
                f"ranks {bad} passed different {key} than rank 0 ({gathered[bad[0]][key]!r} vs "
                f"{gathered[0][key]!r}); every rank must pass the same model layers, config "
                "and batches (each processes only its own shard)."
            )


def _all_reduce(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Σ over ranks, in place, of each (contiguous) tensor."""
    out = [t.contiguous() for t in tensors]
    for t in out:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return out


def fit_ekfac_distributed(
    model: nn.Module,
    task: Task,
    batches: Iterable,
    config: FactorConfig | None = None,
    modules: Sequence[TrackedModule] | None = None,
) -> EKFACFactors:
    """EK-FAC factors of all `batches` (the first config.max_batches), each rank fitting its
    shard and all-reducing the sums (module docstring); the same factors on every rank.
    Without a process group: `fit_ekfac` with the same per-batch label seeds."""
    config = config or FactorConfig()
    modules = list(modules) if modules is not None else find_modules(
        model, config.include, config.exclude)
    items = list(batches)[: config.max_batches]
    seeds = [batch_seed(config.seed, i) for i in range(len(items))]
    if not is_distributed():
        return fit_ekfac(model, task, items, config, modules, batch_seeds=seeds)
    rank, world = rank_and_world()
    _check_same(modules=[(m.name, m.shape) for m in modules],
                config=config.settings([m.name for m in modules]), n_batches=len(items))
    if not items:
        raise ValueError("the data loader yielded no batches; factors need at least one example.")
    idx = shard_range(len(items), rank, world)
    mine, my_seeds = [items[i] for i in idx], [seeds[i] for i in idx]
    local = dataclasses.replace(config, progress=config.progress and rank == 0)
    dtype, device = config.dtype_for(model), next(model.parameters()).device
    cache: list[BatchCapture] = []

    t0 = time.perf_counter()  # Σ_r of the per-rank sums Σ āāᵀ, Σ DsDsᵀ, N_seq, N_tok
    if mine:
        kfac = fit_covariances(model, task, mine, local, modules, cache=cache,
                               batch_seeds=my_seeds)
        n_seq, n_tok = kfac.n_sequences, kfac.n_tokens
        sums = [t for x in kfac.layers for t in (x.A * max(n_tok, 1), x.S * n_seq)]
    else:
        n_seq = n_tok = 0
        sums = [torch.zeros(d, d, dtype=dtype, device=device)
                for m in modules for d in (m.d_in, m.out_features)]
    counts = torch.tensor([n_seq, n_tok], dtype=torch.int64, device=device)
    counts, *sums = _all_reduce([counts, *sums])
    N_seq, N_tok = int(counts[0]), int(counts[1])
    layers = [KroneckerFactors(m.name, a / max(N_tok, 1), s / N_seq)
              for m, a, s in zip(modules, sums[0::2], sums[1::2])]
    kfac = KFACFactors(tuple(layers), config.fisher, N_seq, N_tok, config)
    cov_s = time.perf_counter() - t0

    t0 = time.perf_counter()  # eigh on every rank, rank 0's bases broadcast to all
    eig = fit_eigenbasis(kfac)
    layers = []
    for f in eig.layers:
        ts = [t.contiguous() for t in (f.q_a, f.eig_a, f.q_s, f.eig_s)]
        for t in ts:
            dist.broadcast(t, src=0)
        layers.append(EigenFactors(f.name, *ts))
    eig = dataclasses.replace(eig, layers=tuple(layers))
    eig_s = time.perf_counter() - t0

    t0 = time.perf_counter()  # Σ_r Σ_{n∈B_r} (Q_Sᵀ DW_n Q_A)^⊙2, then / N_seq
    if mine:
        lam = fit_lambda(model, task, mine, eig, local, modules, cache=cache,
                         batch_seeds=my_seeds)
        lam_sums = [f.lam * n_seq for f in lam.layers]  # fit_lambda divides by its own N_seq
    else:
        lam_sums = [torch.zeros(f.shape, dtype=f.q_a.dtype, device=device) for f in eig.layers]
    cache.clear()
    lam_sums = _all_reduce(lam_sums)
    layers = [dataclasses.replace(f, lam=s / N_seq) for f, s in zip(eig.layers, lam_sums)]
    timings = dataclasses.replace(kfac.timings, covariance_s=cov_s, eigendecomposition_s=eig_s,
                                  lambda_s=time.perf_counter() - t0)
    return EKFACFactors(tuple(layers), config.fisher, N_seq, N_tok, config, timings)


def pairwise_scores_distributed(
    model: nn.Module,
    task: Task,
    query_grads_or_batch,
    candidates: Iterable,
    ihvp: InverseHVP,
    modules: Sequence[TrackedModule],
    *,
    by_module: bool = False,
    progress: bool = True,
    preconditioned: bool = False,
) -> torch.Tensor:
    """`pairwise_scores` with the candidate batches sharded over ranks: rank r scores its
    shard into I_r (Q, n_r[, L]); the blocks, padded to max_r n_r, are all-gathered with
    their sizes, so every rank returns I = [I_0 | I_1 | … | I_{W-1}] (Q, N[, L]) in the
    original candidate order. Without a process group: plain `pairwise_scores`."""
    modules = list(modules)
    items = list(candidates)
    if not is_distributed():
        return pairwise_scores(model, task, query_grads_or_batch, items, ihvp, modules,
                               by_module=by_module, progress=progress,
                               preconditioned=preconditioned)
    rank, world = rank_and_world()
    _check_same(modules=[(m.name, m.shape) for m in modules], n_batches=len(items))
    if not items:
        raise ValueError("the candidate set is empty: `candidates` yielded no batches.")
    if isinstance(query_grads_or_batch, Mapping):
        grads = dict(query_grads_or_batch)
    elif preconditioned:
        raise ValueError("preconditioned=True needs Grads from precondition(...), not a batch")
    else:
        grads = query_gradients(model, task, query_grads_or_batch, modules)
    pre = grads if preconditioned else precondition(grads, ihvp)
    mine = shard(items, rank, world)
    if mine:
        block = pairwise_scores(model, task, pre, mine, ihvp, modules, by_module=by_module,
                                progress=progress and rank == 0, preconditioned=True)
    else:
        first = pre[modules[0].name]
        tail = (len(modules),) if by_module else ()
        block = torch.zeros(len(first), 0, *tail, dtype=first.dtype, device=first.device)
    size = torch.tensor([block.shape[1]], dtype=torch.int64, device=block.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    width = max(int(s) for s in sizes)
    padded = block.new_zeros(block.shape[0], width, *block.shape[2:])
    padded[:, : block.shape[1]] = block
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded)
    return torch.cat([b[:, : int(s)] for b, s in zip(blocks, sizes)], dim=1)

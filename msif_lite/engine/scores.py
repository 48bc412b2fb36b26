"""Influence scores: I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)   (positive = z helps q; dm/dε = −I).

Notebook 06 §Scoring documents: precondition the Q query gradients once, P = (G + λI)⁻¹∇m,
then stream candidate batches: each batch costs one forward pass, one backward pass to the
layer outputs and one einsum per layer to form DW_n, and only one batch of candidate
gradients is held at a time. Notebook 06 §Which tokens carry the score? splits a score over the
candidate's token positions: I_t = Σ_l Ds_tᵀ P_l ā_t, which sums over t to I.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.capture import capture_batch, per_sequence_grads
from msif_lite.engine.ihvp import InverseHVP
from msif_lite.engine.layers import Grads, TrackedModule, check_finite
from msif_lite.engine.tasks import Task


def _split(batch, size: int) -> list:
    """Split one batch into chunks of at most `size` examples (TokenBatch or tuple of tensors)."""
    n = len(batch) if hasattr(batch, "select") else batch[0].shape[0]
    if n == 0:
        raise ValueError("got an empty batch of queries; pass at least one query.")
    out = []
    for i in range(0, n, size):
        s = slice(i, i + size)
        out.append(batch.select(s) if hasattr(batch, "select") else tuple(t[s] for t in batch))
    return out


def query_gradients(
    model: nn.Module,
    task: Task,
    queries,
    modules: Sequence[TrackedModule],
    batch_size: int = 16,
) -> Grads:
    """∇_θ m(q) per query, (Q, out, d_in) per layer (m = task.measurement, e.g. −log p(answer))."""
    parts = [
        per_sequence_grads(model, task, b, modules, measurement=True)
        for b in _split(queries, batch_size)
    ]
    return {m.name: torch.cat([p[m.name] for p in parts]) for m in modules}


def precondition(query_grads: Grads, ihvp: InverseHVP) -> Grads:
    """P = (G + λI)⁻¹ ∇m, once per query (Notebook 06 §Scoring documents)."""
    check_finite(query_grads, "query gradients")
    out = ihvp.apply(query_grads)
    check_finite(out, f"preconditioned query gradients ({ihvp.name})")
    return out


def _as_query_grads(model, task, queries, modules) -> Grads:
    if isinstance(queries, Mapping):
        return dict(queries)
    return query_gradients(model, task, queries, modules)


def pairwise_scores(
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
    rank: int | None = None,
) -> torch.Tensor:
    """I[q, n] = Σ_l ⟨P_{q,l}, DW_{n,l}⟩ with P = (G + λI)⁻¹∇m(q): (Q, N), or (Q, N, L)
    per layer with `by_module` (layers in `modules` order; summing over L gives the total).

    `query_grads_or_batch`: a query batch, or query gradients ∇m (Grads); with
    `preconditioned=True`, Grads that are already P = precondition(∇m, ihvp).
    `rank`: score with the rank-r truncated SVD of each layer's P (msif_lite.engine.lowrank;
    Notebook 09), never forming the candidates' DW."""
    queries = _as_query_grads(model, task, query_grads_or_batch, modules)
    if preconditioned:
        if not isinstance(query_grads_or_batch, Mapping):
            raise ValueError("preconditioned=True needs Grads from precondition(...), not a batch")
        check_finite(queries, "preconditioned query gradients")
        pre = queries
    else:
        pre = precondition(queries, ihvp)
    if rank is not None:
        if by_module:
            raise ValueError("by_module=True needs full-rank queries (rank=None)")
        from msif_lite.engine.lowrank import pairwise_scores_lowrank, truncate

        low = truncate(pre, rank)
        del pre
        return pairwise_scores_lowrank(model, task, low, candidates, modules, progress=progress)
    cols = []
    for batch in tqdm(candidates, desc="pairwise scores", disable=not progress):
        dtype = pre[modules[0].name].dtype
        cap = capture_batch(model, task, batch, modules, dtype=dtype)
        per_layer = []
        for m, x in zip(modules, cap.layers):
            dw = x.per_sequence_grad().reshape(cap.n_sequences, -1)
            per_layer.append(pre[m.name].reshape(len(pre[m.name]), -1) @ dw.T)  # (Q, B)
        # NaN/inf in a candidate gradient reaches its scores: check (Q, B), not (B, P)
        check_finite(dict(zip([m.name for m in modules], per_layer)), "candidate scores")
        cols.append(torch.stack(per_layer, -1) if by_module else sum(per_layer))
    if not cols:
        raise ValueError(
            "the candidate set is empty: `candidates` yielded no batches. Pass an iterable of "
            "batches (e.g. a DataLoader or a list of TokenBatch) with at least one example."
        )
    return torch.cat(cols, dim=1)


def self_influence(
    model: nn.Module,
    task: Task,
    candidates: Iterable,
    ihvp: InverseHVP,
    modules: Sequence[TrackedModule],
    *,
    progress: bool = True,
) -> torch.Tensor:
    """I(z, z) = ∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) per candidate, (N,) (Notebook 06 §Self-influence)."""
    out = []
    for batch in tqdm(candidates, desc="self-influence", disable=not progress):
        g = per_sequence_grads(model, task, batch, modules)
        p = ihvp.apply(g)
        out.append(sum((g[m.name] * p[m.name]).sum((-2, -1)) for m in modules))
    if not out:
        raise ValueError("the candidate set is empty: `candidates` yielded no batches.")
    return torch.cat(out)


def module_breakdown(
    scores_by_module: torch.Tensor, modules: Sequence[TrackedModule]
) -> dict[str, torch.Tensor]:
    """Sum (…, L) per-layer scores by layer group ('attention', 'mlp', 'other'); divide by
    the total (scores_by_module.sum(-1)) for each group's share. Groups with no layer are
    left out."""
    if scores_by_module.shape[-1] != len(modules):
        raise ValueError(
            f"scores have {scores_by_module.shape[-1]} layers, `modules` has {len(modules)}; "
            "pass the scores of pairwise_scores(..., by_module=True) and the same modules."
        )
    groups: dict[str, torch.Tensor] = {}
    for i, m in enumerate(modules):
        s = scores_by_module[..., i]
        groups[m.group] = groups[m.group] + s if m.group in groups else s.clone()
    return groups


def per_token_scores(
    model: nn.Module,
    task: Task,
    preconditioned_query_grads: Grads,
    candidate_batch,
    modules: Sequence[TrackedModule],
) -> torch.Tensor:
    """I[q, b, t] = Σ_l Ds_{b,t}ᵀ P_{q,l} ā_{b,t}: token t's share of I(z_b, q); (Q, B, T).
    Σ_t I[q, b, t] = pairwise score; padding positions are exactly 0 (Notebook 06
    §Per-token scores). Pass P = precondition(query_gradients(...), ihvp)."""
    pre = preconditioned_query_grads
    dtype = pre[modules[0].name].dtype
    cap = capture_batch(model, task, candidate_batch, modules, dtype=dtype)
    total = None
    for m, x in zip(modules, cap.layers):
        ds_p = torch.einsum("bto,qoi->qbti", x.ds, pre[m.name])
        s = (ds_p * x.a).sum(-1)
        total = s if total is None else total + s
    check_finite({"per-token scores": total}, "scores")
    return total.masked_fill(~cap.mask, 0.0)

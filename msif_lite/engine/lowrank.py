"""Low-rank query gradients: keep a rank-r SVD of each layer's (preconditioned) query gradient.

Notebook 09 §Low-rank query gradients. A layer's preconditioned query gradient P_l is an (o, d_in)
matrix; its truncated SVD keeps r singular triples,

    P_l ≈ U_r diag(σ_r) V_rᵀ = L R,   L = U_r diag(σ_r) (o, r),  R = V_rᵀ (r, d_in),

which stores r·(o + d_in) numbers instead of o·d_in (BLOOM-560m MLP, r = 32: 1.0% of it).
The score against a candidate never forms the candidate's gradient DW = Σ_t Ds_t ā_tᵀ:

    ⟨L R, DW⟩ = Σ_t Σ_k (Lᵀ Ds_t)_k (R ā_t)_k,

two projections of the captured tokens to r numbers each (B·T·r per layer, instead of the
B·o·d_in of DW). Truncation error: ‖P_l − L R‖_F² = Σ_{k>r} σ_k², so the relative error
per layer is sqrt(Σ_{k>r} σ_k² / Σ_k σ_k²); `agreement` reports what it does to rankings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.capture import BatchCapture, LayerCapture, capture_batch
from msif_lite.engine.correlation import spearman
from msif_lite.engine.layers import Grads, TrackedModule, check_finite
from msif_lite.engine.tasks import Task


@dataclass(frozen=True)
class LowRankGrads:
    """Per layer, left (Q, o, r) = U diag(σ) and right (Q, r, d_in) = Vᵀ: P ≈ left @ right."""

    left: dict[str, torch.Tensor]
    right: dict[str, torch.Tensor]
    rank: int

    def dense(self) -> Grads:
        """The rank-r matrices L R, (Q, o, d_in) per layer."""
        return {k: self.left[k] @ self.right[k] for k in self.left}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.left, self.right)
                   for t in d.values())  # fmt: skip

    def dense_layer(self, name: str) -> torch.Tensor:
        """One layer's rank-r matrices L R, (Q, o, d_in) (the others stay factored)."""
        return self.left[name] @ self.right[name]

    def layer_scores(self, x: LayerCapture) -> torch.Tensor:
        """(Q, B) Σ_t Σ_k (L_lᵀ Ds_t)_k (R_l ā_t)_k = ⟨L_l R_l, DW_l⟩ of one captured layer."""
        u = torch.einsum("bto,qor->qbtr", x.ds, self.left[x.name].to(x.ds.dtype))
        v = torch.einsum("bti,qri->qbtr", x.a, self.right[x.name].to(x.a.dtype))
        return (u * v).sum((-1, -2))

    def scores(self, capture: BatchCapture, by_module: bool = False) -> torch.Tensor:
        """(Q, B) scores Σ_l ⟨L_l R_l, DW_l⟩ of one captured batch, or (Q, B, L) per layer."""
        per_layer = [self.layer_scores(x) for x in capture.layers]
        return torch.stack(per_layer, -1) if by_module else sum(per_layer)


def truncate(grads: Grads, rank: int) -> LowRankGrads:
    """Rank-r truncated SVD (torch.linalg.svd, exact) of every layer's (Q, o, d_in) gradients;
    layers with min(o, d_in) ≤ r are kept exactly (r = min(o, d_in) there)."""
    if not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    check_finite(grads, "query gradients to truncate")
    left, right = {}, {}
    for name, g in grads.items():
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        r = min(rank, s.shape[-1])
        left[name] = (u[..., :r] * s[..., None, :r]).contiguous()
        right[name] = vh[..., :r, :].contiguous()
    return LowRankGrads(left, right, rank)


def relative_error(grads: Grads, low: LowRankGrads) -> torch.Tensor:
    """(Q,) ‖P − L R‖_F / ‖P‖_F over all layers, per query."""
    dense = low.dense()
    num = sum((grads[k] - dense[k]).double().pow(2).sum((-2, -1)) for k in grads)
    den = sum(grads[k].double().pow(2).sum((-2, -1)) for k in grads)
    return (num / den.clamp_min(1e-300)).sqrt()


def pairwise_scores_lowrank(
    model: nn.Module,
    task: Task,
    low: LowRankGrads,
    candidates: Iterable,
    modules: Sequence[TrackedModule],
    *,
    progress: bool = True,
    by_module: bool = False,
    total: int | None = None,
) -> torch.Tensor:
    """(Q, N) I[q, n] = Σ_l ⟨L_l R_l, DW_{n,l}⟩ for preconditioned low-rank queries ((Q, N, L)
    per layer with `by_module`); the same as `pairwise_scores(..., preconditioned=True)` on
    `low.dense()`, without forming DW."""
    cols = []
    dtype = next(iter(low.left.values())).dtype
    total = len(candidates) if isinstance(candidates, Sized) else total  # for the bar
    for batch in tqdm(candidates, desc="pairwise scores (low rank)", total=total,
                      disable=not progress):  # fmt: skip
        cap = capture_batch(model, task, batch, modules, dtype=dtype)
        s = low.scores(cap, by_module)
        check_finite({"scores": s}, "candidate scores")
        cols.append(s)
    if not cols:
        raise ValueError("the candidate set is empty: `candidates` yielded no batches.")
    return torch.cat(cols, dim=1)


def agreement(full: torch.Tensor, approx: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How a low-rank (Q, N) score matrix agrees with the full-rank one: mean over queries of
    Spearman's ρ, the relative error ‖S_r − S‖_F / ‖S‖_F, and the mean top-k overlap."""
    if full.shape != approx.shape:
        raise ValueError(f"score shapes differ: {tuple(full.shape)} vs {tuple(approx.shape)}")
    rho = [spearman(f, a) for f, a in zip(full, approx)]
    k = min(k, full.shape[1])
    top = [len(set(f.topk(k).indices.tolist()) & set(a.topk(k).indices.tolist())) / k
           for f, a in zip(full, approx)]  # fmt: skip
    rel = float((approx.double() - full.double()).norm() / full.double().norm().clamp_min(1e-300))
    return {"spearman": float(sum(rho) / len(rho)), "relative_error": rel,
            f"top{k}_overlap": float(sum(top) / len(top))}  # fmt: skip

"""Metrics the notebooks and the benchmarks share (one copy each): rank correlations,
reciprocal rank and recall of a ranked list, mean ± std, and the linear datamodeling score.

- `spearman`: Pearson correlation of the average ranks (ties share the mean rank; defined
  in `msif_lite.engine.correlation`, which the engine's own reports use, and re-exported);
- `rank_candidates`: order candidates by score, best first; ties broken by a seeded random
  permutation (a method that scores many documents equally gets no credit from the order
  candidates were listed in);
- `reciprocal_rank`: 1 / (1-based rank of the first true source), 0 if none is ranked;
- `recall_at_k`: |true ∩ top-k| / |true|;
- `mean_std`: mean and sample standard deviation (ddof=1);
- `lds`: the linear datamodeling score (notebook 10 §The datamodel view).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from msif_lite.engine.correlation import pearson, ranks, spearman  # noqa: F401 - shared here


def rank_candidates(scores: Sequence[float] | np.ndarray, candidates: Sequence[str],
                    rng: np.random.Generator | None = None) -> list[str]:  # fmt: skip
    """Candidates sorted by descending score; equal scores in a random (seeded) order."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(candidates),):
        raise ValueError(f"{s.shape[0] if s.ndim else 0} scores for {len(candidates)} candidates")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf: cannot rank the candidates")
    perm = (rng or np.random.default_rng(0)).permutation(len(s))
    order = perm[np.argsort(-s[perm], kind="stable")]
    return [candidates[i] for i in order]


def reciprocal_rank(ranked: Sequence[str], true: set[str] | Sequence[str]) -> float:
    """1 / rank of the first true source in `ranked` (rank 1 = first); 0.0 if absent."""
    truth = set(true)
    if not truth:
        raise ValueError("no true sources: the reciprocal rank is undefined")
    for i, d in enumerate(ranked):
        if d in truth:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], true: set[str] | Sequence[str], k: int = 10) -> float:
    """|true ∩ ranked[:k]| / |true| (true sources missing from `ranked` count as not found)."""
    truth = set(true)
    if not truth:
        raise ValueError("no true sources: recall is undefined")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(truth & set(ranked[:k])) / len(truth)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1; 0.0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def sem(values: Sequence[float]) -> float:
    """Standard error of the mean: std (ddof=1) / √n (0.0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0


def subset_predictions(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(M, Q) predicted change of m for each subset: −Σ_{z ∈ S_j} I(z, q).

    With I(z, q) > 0 when z helps q (lowers m), keeping more helpful documents predicts a
    lower m: the datamodel m_j(q) ≈ c_q − Σ_{z ∈ S_j} I(z, q) (notebook 10 §The datamodel).
    """
    if scores.shape[1] != masks.shape[1]:
        raise ValueError(f"scores cover {scores.shape[1]} documents, the masks "
                         f"{masks.shape[1]}: score every document of the corpus")  # fmt: skip
    return -(masks.double() @ scores.double().T)


def lds(scores: torch.Tensor, masks: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """Linear datamodeling score per query (Park et al. 2023):

        LDS_q = Spearman_j( −Σ_{z ∈ S_j} I(z, q),  m_j(q) )

    scores (Q, N) over every document, masks (M, N) bool (documents kept in subset j),
    measured (M, Q) the retrained models' m. A query whose prediction is constant over the
    subsets (every score zero) gets LDS 0 (it predicts nothing)."""
    pred = subset_predictions(scores, masks)
    if pred.shape != measured.shape:
        raise ValueError(f"{tuple(measured.shape)} measurements for {tuple(pred.shape)} "
                         "predictions: one row per subset, one column per query")  # fmt: skip
    out = torch.empty(pred.shape[1], dtype=torch.float64)
    for q in range(pred.shape[1]):
        flat = bool((pred[:, q] == pred[0, q]).all()) or bool(
            (measured[:, q] == measured[0, q]).all())
        out[q] = 0.0 if flat else spearman(pred[:, q], measured[:, q])
    return out


def mean_reciprocal_rank(scores: torch.Tensor, doc_ids: Sequence[str],
                         truths: Sequence[set[str]], seed: int = 0) -> float:  # fmt: skip
    """MRR when each query (row of `scores`) ranks every document of `doc_ids`; ties broken
    by one seeded random order per call (`rank_candidates`)."""
    rng = np.random.default_rng(seed)
    return float(np.mean([reciprocal_rank(rank_candidates(row.numpy(), list(doc_ids), rng), t)
                          for row, t in zip(scores.double(), truths)]))  # fmt: skip

"""Rank correlations the engine reports itself (e.g. `lowrank.agreement`); `eval.metrics`
re-exports them with the other evaluation metrics.

- `ranks`: average ranks (ties share the mean rank);
- `pearson`: Pearson correlation of two score vectors;
- `spearman`: Spearman's ρ, the Pearson correlation of the average ranks.
"""

from __future__ import annotations

import torch


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as Spearman's ρ needs."""
    x = x.double().flatten()
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inverse = torch.unique(x, return_inverse=True)
    if len(uniq) < len(x):  # average the ranks within each tie group
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, r)
        counts = torch.bincount(inverse, minlength=len(uniq)).double()
        r = (sums / counts)[inverse]
    return r


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two score vectors."""
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ = Pearson correlation of the average ranks."""
    return pearson(ranks(a), ranks(b))

"""Static figures of attribution results, for papers, slides and notebooks rendered without
a kernel (Notebook 07 §Exploring results; the live version is `msif_lite.viz.explorer`).

Every function returns a matplotlib Figure with labelled axes and a title. The figure is
closed in pyplot before it is returned, so a notebook shows it once (as the cell's value)
and scripts save it with `fig.savefig(...)`. Colours: red = helps the answer, blue =
hurts; attention layers orange, MLP layers green (as in the explorer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from msif_lite.eval.metrics import ranks, spearman
from msif_lite.viz.layers import GROUP_COLOURS, TRUE_COLOUR, layer_of


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _done(fig: Figure) -> Figure:
    fig.tight_layout()
    plt.close(fig)
    return fig


def score_distributions(
    scores: Mapping[str, Sequence[float] | torch.Tensor],
    true_sources: Sequence[bool] | None = None,
    *,
    bins: int = 30,
    title: str = "Score distributions",
) -> Figure:
    """One histogram per method (each on its own scale); true sources as red ticks below.

    scores: method → scores of the same candidates; true_sources: a mask over them."""
    if not scores:
        raise ValueError("no scores to plot: pass {method: scores}")
    n = len(scores)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    mask = None if true_sources is None else np.asarray(true_sources, dtype=bool)
    for ax, (name, s) in zip(axes.flat, scores.items()):
        v = _array(s)
        ax.hist(v, bins=bins, color="#7f7f7f", alpha=0.8, label="candidates")
        if mask is not None and mask.any():
            ax.plot(v[mask], np.zeros(mask.sum()), "|", color=TRUE_COLOUR, ms=14, mew=2,
                    label="true sources")  # fmt: skip
            ax.legend(fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("score (higher = helps)")
        ax.set_ylabel("documents")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _done(fig)


def rank_comparison(
    a: Sequence[float] | torch.Tensor,
    b: Sequence[float] | torch.Tensor,
    names: tuple[str, str] = ("multi-stage", "single-stage"),
    true_sources: Sequence[bool] | None = None,
) -> Figure:
    """Ranks of the same candidates under two methods (1 = most helpful), Spearman ρ in the
    title; points on the diagonal are ranked alike."""
    va, vb = _array(a), _array(b)
    if va.shape != vb.shape or va.size < 2:
        raise ValueError("rank_comparison needs two score vectors of the same length (>= 2)")
    ta, tb = torch.from_numpy(va), torch.from_numpy(vb)
    ra = len(va) - ranks(ta).numpy()  # rank 1 = highest score
    rb = len(vb) - ranks(tb).numpy()
    rho = spearman(ta, tb)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([1, len(va)], [1, len(va)], color="#bbbbbb", lw=1, zorder=0)
    ax.scatter(ra, rb, s=12, color="#555555", label="candidates")
    if true_sources is not None and np.any(true_sources):
        m = np.asarray(true_sources, dtype=bool)
        ax.scatter(ra[m], rb[m], s=40, color=TRUE_COLOUR, label="true sources")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"rank under {names[0]} (1 = most helpful)")
    ax.set_ylabel(f"rank under {names[1]} (1 = most helpful)")
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_title(f"{names[0]} vs {names[1]}: Spearman ρ = {rho:.3f}")
    return _done(fig)


def _layer_group(item) -> tuple[str, str]:
    if isinstance(item, tuple):
        return str(item[0]), str(item[1])
    return layer_of(item.name), item.group


def layer_contributions(
    by_module: Sequence[float] | torch.Tensor,
    modules: Sequence,
    *,
    title: str = "Score by layer",
) -> Figure:
    """Bars of one score split over layers, attention and MLP side by side (coloured).

    by_module: (L,) per tracked module (`scores(..., by_module=True)[q, n]`); modules: the
    TrackedModules in that order, or (layer, group) pairs."""
    v = _array(by_module)
    if len(v) != len(modules):
        raise ValueError(f"{len(v)} scores for {len(modules)} modules: pass matching lists")
    sums: dict[tuple[str, str], float] = {}
    for item, x in zip(modules, v):
        key = _layer_group(item)
        sums[key] = sums.get(key, 0.0) + float(x)
    layers = list(dict.fromkeys(k[0] for k in sums))
    groups = list(dict.fromkeys(k[1] for k in sums))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(layers) + 2), 3.2))
    x = np.arange(len(layers))
    for j, g in enumerate(groups):
        h = [sums.get((layer, g), 0.0) for layer in layers]
        ax.bar(x + (j - (len(groups) - 1) / 2) * width, h, width,
               color=GROUP_COLOURS.get(g, "#7f7f7f"), label=g)  # fmt: skip
    ax.axhline(0, color="#555555", lw=0.8)
    ax.set_xticks(x, layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("contribution to the score")
    total = float(v.sum())
    ax.set_title(f"{title} (total {total:+.3g})")
    ax.legend(fontsize=8)
    return _done(fig)


def token_heatmap(
    tokens: Sequence[str],
    scores: Sequence[float] | torch.Tensor,
    *,
    per_line: int = 10,
    title: str = "Per-token influence",
) -> Figure:
    """A document's tokens in reading order (wrapped every `per_line`), each cell coloured
    by its share of the score (diverging, 0 = white; red helps, blue hurts)."""
    v = _array(scores)
    if len(v) != len(tokens) or not len(tokens):
        raise ValueError(f"{len(tokens)} tokens and {len(v)} scores: pass one score per token")
    lines = -(-len(v) // per_line)
    grid = np.full((lines, per_line), np.nan)
    grid.flat[: len(v)] = v
    peak = float(np.abs(v).max()) or 1.0
    fig, ax = plt.subplots(figsize=(1.05 * per_line + 1.5, 0.45 * lines + 1.3))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="white")
    im = ax.imshow(grid, cmap=cmap, norm=TwoSlopeNorm(0.0, -peak, peak), aspect="auto")
    for i, t in enumerate(tokens):
        r, c = divmod(i, per_line)
        ax.text(c, r, t.replace("\n", "⏎")[:12], ha="center", va="center", fontsize=8)
    ax.set_xticks(range(per_line))
    ax.set_yticks(range(lines), [str(r * per_line) for r in range(lines)])
    ax.set_xlabel("token within line")
    ax.set_ylabel("first token index of line")
    fig.colorbar(im, ax=ax, label="influence (red helps)")
    ax.set_title(f"{title} (sum {v.sum():+.3g})")
    return _done(fig)

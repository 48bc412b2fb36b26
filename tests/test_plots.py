"""Static figures (msif_lite.viz.plots): each draws, has labelled axes and a title, and is
closed in pyplot (a notebook shows it once)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from msif_lite.eval.metrics import spearman  # noqa: E402
from msif_lite.viz import plots  # noqa: E402

RNG = np.random.default_rng(0)
A = RNG.normal(size=40)
B = A + 0.3 * RNG.normal(size=40)
TRUE = np.arange(40) < 3
MODULES = [("0", "attention"), ("0", "attention"), ("0", "mlp"), ("0", "mlp"),
           ("1", "attention"), ("1", "attention"), ("1", "mlp"), ("1", "mlp")]  # fmt: skip


def check_drawn(fig: Figure) -> list:
    """Draw the figure; every visible data axes has both labels; the figure has a title."""
    assert isinstance(fig, Figure)
    assert not plt.fignum_exists(fig.number), "figures are closed before they are returned"
    fig.canvas.draw()
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), "unlabelled axes"
    titles = [ax.get_title() for ax in axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
    assert any(titles)
    return axes


def test_score_distributions_one_panel_per_method_with_true_sources():
    fig = plots.score_distributions({"multi-stage": A, "single-stage": torch.tensor(B),
                                     "bm25": np.abs(A)}, TRUE)  # fmt: skip
    axes = check_drawn(fig)
    assert [ax.get_title() for ax in axes] == ["multi-stage", "single-stage", "bm25"]
    assert "true sources" in [t.get_text() for t in axes[0].get_legend().get_texts()]
    with pytest.raises(ValueError, match="no scores"):
        plots.score_distributions({})


def test_rank_comparison_reports_spearman_in_the_title():
    (ax,) = check_drawn(plots.rank_comparison(A, B, ("multi-stage", "grad dot"), TRUE))
    rho = spearman(torch.tensor(A), torch.tensor(B))
    assert f"Spearman ρ = {rho:.3f}" in ax.get_title() and "multi-stage" in ax.get_xlabel()
    (ax,) = check_drawn(plots.rank_comparison(A, -A))
    assert "ρ = -1.000" in ax.get_title()
    with pytest.raises(ValueError, match="same length"):
        plots.rank_comparison(A, B[:5])


def test_layer_contributions_sums_modules_per_layer_and_group():
    v = [1.0, 2.0, 3.0, -1.0, 0.5, 0.5, -4.0, 1.0]
    (ax,) = check_drawn(plots.layer_contributions(v, MODULES))
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [-3.0, 1.0, 2.0, 3.0]  # (0,attn)=3 (0,mlp)=2 (1,attn)=1 (1,mlp)=-3
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["attention", "mlp"]
    assert "total +3" in ax.get_title()
    with pytest.raises(ValueError, match="modules"):
        plots.layer_contributions(v[:3], MODULES)


def test_token_heatmap_wraps_tokens_and_labels_the_colour_scale():
    tokens = [f" w{i}" for i in range(23)]
    scores = RNG.normal(size=23)
    fig = plots.token_heatmap(tokens, scores, per_line=10)
    (ax,) = check_drawn(fig)
    assert ax.images[0].get_array().shape == (3, 10)
    assert [t.get_text() for t in ax.texts][:2] == [" w0", " w1"]
    assert any(a.get_ylabel().startswith("influence") for a in fig.axes)  # the colour bar
    with pytest.raises(ValueError, match="one score per token"):
        plots.token_heatmap(tokens, scores[:5])

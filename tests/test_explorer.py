"""The result explorer (msif_lite.viz.explorer) on a tiny saved world: driven through its
widgets as a person would, cached so sliders never refit, and executed headless."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import nbformat  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers_world import build_tiny_shipped, explorer_notebook, load_tiny  # noqa: E402

import msif_lite.attribution.attributor  # noqa: E402
import msif_lite.engine.gradstore  # noqa: E402
from msif_lite.attribution.attributor import AttributionConfig, Attributor  # noqa: E402
from msif_lite.attribution.methods import gradient_methods  # noqa: E402
from msif_lite.engine.curvature import CURVATURES  # noqa: E402
from msif_lite.engine.factors import FactorConfig  # noqa: E402
from msif_lite.viz import plots  # noqa: E402
from msif_lite.viz.explorer import open_explorer  # noqa: E402
from msif_lite.viz.explorer_data import Settings, is_gradient  # noqa: E402

K = 5


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return build_tiny_shipped(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _config(cache_dir: Path) -> AttributionConfig:
    return AttributionConfig(cache_dir=str(cache_dir), progress=False,
                             factors=FactorConfig(max_batches=2))


@pytest.fixture(scope="module")
def explorer(tiny_root, cache_dir):
    return open_explorer(load_tiny(tiny_root), config=_config(cache_dir), candidates_k=K,
                         n_candidates=None)  # fmt: skip


def hits(html: str) -> list[str]:
    return re.findall(r'class="msif-hit" data-doc="([^"]+)"', html)


def test_opens_with_a_ranked_list_scores_and_true_sources(explorer):
    v = explorer.view
    assert len(v.doc_ids) == K and v.scores == sorted(v.scores, reverse=True)
    assert hits(explorer.ranked_view.value) == v.doc_ids
    truth = explorer.data.queries[0].true_sources
    assert truth  # a world query: its true sources are known
    marked = explorer.ranked_view.value.count("✓ true source")
    assert marked == sum(d in truth for d in v.doc_ids)
    assert "Multi-stage" in explorer.status.value and "188 candidates" in explorer.status.value
    assert "0 · attention" in explorer.layers_view.value
    assert "1 · mlp" in explorer.layers_view.value


def test_query_method_damping_and_alpha_change_the_ranking(explorer):
    explorer.method.value = "multi_stage"
    first = (explorer.view.doc_ids, explorer.view.scores)
    explorer.query.value = 1
    assert explorer.view.query == explorer.data.queries[1]
    assert (explorer.view.doc_ids, explorer.view.scores) != first
    assert hits(explorer.ranked_view.value) == explorer.view.doc_ids
    base = explorer.view.scores
    explorer.damping.value = 10.0
    assert explorer.view.scores != base and explorer.view.settings.damping == 10.0
    explorer.alpha.value = 1.0
    assert explorer.view.settings.alpha == 1.0
    explorer.method.value = "bm25"
    assert explorer.damping.disabled and explorer.alpha.disabled
    assert "BM25" in explorer.status.value and "text-similarity" in explorer.layers_view.value
    explorer.method.value = "single_stage"
    assert not explorer.damping.disabled and explorer.alpha.disabled
    explorer.damping.value, explorer.alpha.value, explorer.query.value = 0.1, 0.01, 0


def test_cached_scores_match_the_attributor(explorer):
    data = explorer.data
    q = data.queries[2]
    cands = data.candidates(q)
    for method in [m for m in gradient_methods() if is_gradient(m)]:
        mine, layers = data.all_scores(q, Settings.make(method, 0.1, data.alpha0))
        ref = data.att.scores(method, [q], cands[:40])[0].double()
        torch.testing.assert_close(mine[:40], ref, rtol=1e-4,
                                   atol=1e-6 * float(ref.abs().max()))  # fmt: skip
        torch.testing.assert_close(layers.sum(-1), mine)


def test_per_token_spans_render_and_sum_to_the_score(explorer):
    explorer.method.value = "multi_stage"
    v, tokens = explorer.view, explorer.tokens
    html = explorer.ranked_view.value
    n_tokens = sum(len(tokens[d][0]) for d in v.doc_ids)
    assert html.count('class="msif-tok"') == n_tokens
    assert "rgba(214,39,40" in html and "rgba(31,119,180" in html  # helps and hurts
    for d, s in zip(v.doc_ids, v.scores):
        assert sum(tokens[d][1]) == pytest.approx(s, rel=1e-3, abs=1e-6 * abs(s))
        assert "".join(tokens[d][0]).startswith(explorer.data.att.texts[d][:20])
    explorer.method.value = "embedding" if os.environ.get("MSIF_TEST_EMBEDDING") else "bm25"
    assert 'class="msif-tok"' not in explorer.ranked_view.value
    explorer.method.value = "multi_stage"


def test_sliders_do_not_refit_factors_or_recompute_candidate_gradients(
    explorer, cache_dir, monkeypatch
):
    calls = {"fit": 0, "grads": 0}
    fit, grads = CURVATURES["ekfac"].fit, msif_lite.engine.gradstore.capture_batch

    def count(name, f):
        def wrapped(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)

        return wrapped

    monkeypatch.setitem(CURVATURES, "ekfac", replace(CURVATURES["ekfac"], fit=count("fit", fit)))
    monkeypatch.setattr(msif_lite.engine.gradstore, "capture_batch", count("grads", grads))
    files = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*") if p.is_file()}
    explorer.method.value = "multi_stage"
    for d in (0.01, 1.0, 0.1):
        explorer.damping.value = d
    for a in (0.1, 10.0, 0.01):
        explorer.alpha.value = a
    explorer.method.value = "single_stage"
    explorer.damping.value = 0.3
    assert calls == {"fit": 0, "grads": 0}
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*") if p.is_file()} == files
    before = dict(explorer.data.stats)
    explorer.damping.value = 0.1  # a setting seen before: nothing is recomputed
    explorer.method.value = "multi_stage"
    assert dict(explorer.data.stats) == before and "cached" in explorer.status.value


def test_typed_questions(explorer):
    world_q = explorer.data.queries[3]
    explorer.question.value = world_q.prompt.replace("Question:", "").replace("Answer:", "")
    assert explorer.query.value == 3
    n = len(explorer.query.options)
    explorer.answer.value = "Narvosk"
    explorer.question.value = "Where did the river spirit live?"
    assert len(explorer.query.options) == n + 1 and explorer.query.value == n
    assert explorer.view.query.answer == "Narvosk" and explorer.view.query.true_sources is None
    assert "✓" not in explorer.ranked_view.value.replace("✓</span> = true", "")
    explorer.answer.value = ""
    explorer.question.value = "Where is ☃?"  # the tokenizer may not know it: no crash
    explorer.query.value = 0


def test_static_snapshot_is_kept_beside_the_widget(explorer):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert hits(bundle["text/html"]) == explorer.view.doc_ids
    assert "msif-tok" in bundle["text/html"] and "by layer" in bundle["text/html"]
    assert "explorer" in bundle["text/plain"]


def test_static_plots_from_explorer_results(explorer):
    v = explorer.view
    fig = plots.layer_contributions(v.by_layer[0], explorer.data.att.modules)
    assert fig.axes[0].get_xlabel() == "layer"
    fig = plots.token_heatmap(*explorer.tokens[v.doc_ids[0]])
    assert fig.axes[0].get_title().startswith("Per-token influence")


def test_attributor_source_needs_queries(tiny_root, cache_dir):
    s = load_tiny(tiny_root)
    att = Attributor(s.pretrained, s.finetuned, s.tokenizer,
                     [(d.doc_id, d.text) for d in s.world.documents[:30]],
                     [(p.prompt, p.answer) for p in s.world.finetune_qa], _config(cache_dir),
                     alpha=s.alpha)  # fmt: skip
    with pytest.raises(ValueError, match="needs queries"):
        open_explorer(att)
    ex = open_explorer(att, s.world.queries[:2], candidates_k=3, n_candidates=None)
    assert len(ex.view.doc_ids) == 3 and ex.data.queries[0].true_sources


@pytest.mark.slow
def test_headless_execution_leaves_a_static_rendering(tiny_root, cache_dir, tmp_path):
    """`jupyter nbconvert --execute` and nbval run the notebook; the output keeps HTML."""
    path = tmp_path / "explore.ipynb"
    nbformat.write(explorer_notebook(tiny_root, cache_dir), path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    bindir = Path(sys.executable).parent
    run = subprocess.run(
        [str(bindir / "jupyter"), "nbconvert", "--to", "notebook", "--execute",
         "--ExecutePreprocessor.timeout=300", "--output", "executed.ipynb", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    nb = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    outs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outs if o.output_type == "error"]
    shown = [o for o in outs if "text/html" in o.get("data", {})]
    assert shown and 'class="msif-hit"' in shown[0].data["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in shown[0].data
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-current-env", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]

"""The method and curvature registries: a method added by one `register` call reaches the
Attributor, the explorer, the CLI and the benchmarks; each registered variant equals its
formula written out by hand; the curvature field swaps the approximation everywhere."""

from __future__ import annotations

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution import methods as M
from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import GradientMethod, Normalise, Stage
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.ihvp import KFACIHVP, Damping
from msif_lite.engine.multistage import MultiStageIHVP
from msif_lite.engine.scores import precondition


@pytest.fixture(scope="module")
def att(tmp_path_factory):
    root = build_tiny_shipped(tmp_path_factory.mktemp("reg"))
    s = load_tiny(root)
    return _att(s, root / "cache")


def _att(s, cache, **cfg):
    return Attributor(s.pretrained, s.finetuned, s.tokenizer,
                      [(d.doc_id, d.text) for d in s.world.documents[:30]],
                      [(p.prompt, p.answer) for p in s.world.finetune_qa[:16]],
                      AttributionConfig(cache_dir=str(cache), progress=False,
                                        factors=FactorConfig(max_batches=2), **cfg),
                      alpha=s.alpha)  # fmt: skip


def _q(att):
    return [type("Q", (), {"prompt": f"Question: Where was {n} born?\nAnswer:", "answer": a})()
            for n, a in (("Ludrur Draethund", "Narvosk"), ("Kexynd Lyzol", "Lumora"))]


def test_every_registered_method_scores_and_the_registry_is_one_place():
    assert {"multi_stage", "single_stage", "finetune_only", "grad_dot", "grad_cosine",
            "multi_stage_cosine", "multi_stage_mlp", "multi_stage_alpha_inf", "bm25",
            "embedding", "random"} <= set(M.METHODS)  # fmt: skip
    with pytest.raises(ValueError, match="already registered"):
        M.register(M.METHODS["grad_dot"])
    with pytest.raises(ValueError, match="unknown method 'nosuch': set method= .* to one of"):
        M.get_method("nosuch")


def test_multi_stage_cosine_is_the_multi_stage_score_over_both_gradient_norms(att):
    qs, docs = _q(att), att.doc_ids[:10]
    ms = att.scores("multi_stage", qs, docs)
    qg = att.query_grads(qs, Stage.FINETUNED)
    qn = sum(v.double().pow(2).sum((-2, -1)) for v in qg.values()).sqrt()
    g = att.store("pretrained").grads(att.candidates(docs))
    dn = sum(v.double().pow(2).sum((-2, -1)) for v in g.values()).sqrt()
    torch.testing.assert_close(att.scores("multi_stage_cosine", qs, docs),
                               ms / (qn[:, None] * dn[None, :]), rtol=1e-5, atol=1e-12)


def test_alpha_inf_and_mlp_variants_equal_their_formulas(att):
    qs, docs = _q(att), att.doc_ids[:10]
    inf = att.scores("multi_stage_alpha_inf", qs, docs)
    single_at_ft = precondition(att.query_grads(qs, Stage.FINETUNED),
                                att.inverse(Stage.PRETRAINED, Damping()))  # fmt: skip
    by_hand = att.store("pretrained").scores(single_at_ft, att.candidates(docs)).double()
    torch.testing.assert_close(inf, by_hand, rtol=1e-5, atol=1e-9)
    # a very large α in the multi-stage formula tends to it
    far = M.ScoreSettings(alpha=1e9)
    torch.testing.assert_close(att.scores("multi_stage", qs, docs, settings=far), inf,
                               rtol=1e-3, atol=1e-3 * float(inf.abs().max()))  # fmt: skip
    layers = att.scores("multi_stage", qs, docs, by_module=True)
    mlp = torch.tensor([m.group == "mlp" for m in att.modules])
    torch.testing.assert_close(att.scores("multi_stage_mlp", qs, docs), layers[..., mlp].sum(-1))


def test_a_new_method_is_one_register_call_and_reaches_explorer_cli_and_bench(att, monkeypatch,
                                                                              capsys):
    new = GradientMethod("test_pt_cosine", "θ_pt cosine (test)", "a method added in a test",
                         Stage.PRETRAINED, Stage.PRETRAINED, normalise=Normalise.UNIT)
    monkeypatch.setitem(M.METHODS, new.name, new)
    qs, docs = _q(att), att.doc_ids[:8]
    s = att.scores("test_pt_cosine", qs, docs)
    assert s.shape == (2, 8) and s.abs().max() <= 1 + 1e-6  # a cosine
    from msif_lite.cli import _parser, main
    from msif_lite.viz.explorer_data import ExplorerData, ExplorerQuery, Settings

    assert main(["methods"]) == 0 and "test_pt_cosine" in capsys.readouterr().out
    trace = next(a for a in _parser()._subparsers._group_actions[0].choices["trace"]._actions
                 if a.dest == "method")  # fmt: skip
    assert "test_pt_cosine" in trace.choices
    data = ExplorerData(att, [ExplorerQuery(qs[0].prompt, qs[0].answer)], n_candidates=None)
    mine, layers = data.all_scores(data.queries[0], Settings.make("test_pt_cosine", 0.1, 0.01))
    torch.testing.assert_close(mine[:8], att.scores("test_pt_cosine", qs[:1], att.doc_ids[:8])[0],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    from msif_lite.bench import lds

    assert "test_pt_cosine" in lds.all_scores(att, qs, ["test_pt_cosine"])


def test_the_curvature_field_swaps_the_approximation(tmp_path):
    root = build_tiny_shipped(tmp_path / "c")
    s = load_tiny(root)
    qs = _q(None)
    ident = _att(s, tmp_path / "id", curvature="identity")
    docs = ident.doc_ids[:10]
    # identity curvature: α (αI)⁻¹ (0 + 0·I)⁻¹ → the plain gradient dot product
    torch.testing.assert_close(ident.scores("multi_stage", qs, docs),
                               ident.scores("grad_dot", qs, docs), rtol=1e-5, atol=0)  # fmt: skip
    kf = _att(s, tmp_path / "kf", curvature="kfac")
    assert not kf.pretrain_factors.has_lambda  # K-FAC fits no Λ pass
    h_ft = kf.finetune_factors.scaled(kf.finetune_objective_scale)  # G_ft / T̄ (token mean)
    ihvp = MultiStageIHVP(KFACIHVP(h_ft, Damping(absolute=kf.alpha)),
                          KFACIHVP(kf.pretrain_factors, Damping()), kf.alpha)
    pre = precondition(kf.query_grads(qs, Stage.FINETUNED), ihvp)
    by_hand = kf.store("pretrained").scores(pre, kf.candidates(docs)).double()
    torch.testing.assert_close(kf.scores("multi_stage", qs, docs), by_hand, rtol=1e-5, atol=1e-9)
    ek = _att(s, tmp_path / "ek")
    assert not torch.allclose(ek.scores("multi_stage", qs, docs), by_hand)

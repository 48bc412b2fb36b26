"""Fact-tracing benchmark (Exp 2): metric functions on hand-computed cases, and the fast
benchmark end to end on a tiny untrained world (JSON schema, files)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msif_lite.eval import fact_tracing as tm
from msif_lite.eval import metrics


def test_reciprocal_rank_hand_computed():
    ranked = ["a", "b", "c", "d"]
    assert metrics.reciprocal_rank(ranked, {"c"}) == 1 / 3
    assert metrics.reciprocal_rank(ranked, {"d", "b"}) == 1 / 2  # the first true source counts
    assert metrics.reciprocal_rank(ranked, ["a"]) == 1.0
    assert metrics.reciprocal_rank(ranked, {"z"}) == 0.0  # not retrieved: not found
    with pytest.raises(ValueError, match="no true sources"):
        metrics.reciprocal_rank(ranked, set())


def test_recall_at_k_hand_computed():
    ranked = [f"d{i}" for i in range(12)]
    assert metrics.recall_at_k(ranked, {"d2", "d11"}, 10) == 0.5  # d11 is 12th
    assert metrics.recall_at_k(ranked, {"d0", "d9", "d10", "zz"}, 10) == 0.5
    assert metrics.recall_at_k(ranked, {"d3"}, 3) == 0.0
    assert metrics.recall_at_k(ranked[:2], {"d0", "d1", "d5"}, 10) == 2 / 3  # short list
    with pytest.raises(ValueError):
        metrics.recall_at_k(ranked, {"d0"}, 0)


def test_rank_candidates_order_and_ties():
    assert metrics.rank_candidates([1.0, 3.0, 2.0], ["a", "b", "c"]) == ["b", "c", "a"]
    orders = {tuple(metrics.rank_candidates([5.0, 1.0, 1.0, 1.0], list("wxyz"),
                                       np.random.default_rng(s))) for s in range(20)}  # fmt: skip
    assert all(o[0] == "w" and set(o[1:]) == set("xyz") for o in orders)
    assert len(orders) > 1  # ties are not resolved by listing order
    with pytest.raises(ValueError, match="NaN"):
        metrics.rank_candidates([np.nan, 1.0], ["a", "b"])
    with pytest.raises(ValueError):
        metrics.rank_candidates([1.0], ["a", "b"])


def test_evaluate_hand_computed():
    col = {"a": 0, "b": 1, "c": 2, "d": 3}
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.0, 0.2, 0.4, 0.8]])
    # q0 ranks a, c, d, b; source c → RR 1/2. q1 (row 1) ranks only [a, b, c]: c, b, a;
    # sources {a, d}: a is 3rd → RR 1/3, recall@10 = 1/2 (d is not a candidate).
    mrr, rec, rrs, firsts = tm.evaluate(scores, col, [list("abcd"), list("abc")],
                                        [{"c"}, {"a", "d"}], [0, 1], np.random.default_rng(0))
    assert rrs == [1 / 2, 1 / 3] and firsts == ["a", "c"]
    assert mrr == pytest.approx((1 / 2 + 1 / 3) / 2, abs=1e-15)
    assert rec == pytest.approx((1 + 1 / 2) / 2, abs=1e-15)


def test_mean_std_and_summarize():
    assert metrics.mean_std([0.5, 0.7, 0.9]) == pytest.approx((0.7, 0.2), abs=1e-15)
    assert metrics.mean_std([0.4]) == (0.4, 0.0)
    s = tm.summarize([(0.5, 1.0), (0.7, 0.0), (0.9, 0.5)])
    assert s == pytest.approx({"mrr_mean": 0.7, "mrr_std": 0.2, "recall10_mean": 0.5,
                               "recall10_std": 0.5}, abs=1e-15)  # fmt: skip


def test_mlp_shares_hand_computed():
    mlp = np.array([[3.0, -1.0], [2.0, 0.0]])
    attn = np.array([[1.0, 1.0], [-2.0, 4.0]])
    true = np.array([[True, False], [False, True]])
    s = tm.mlp_shares(mlp, attn, true)
    # abs_all: q0 (3+1)/(3+1+1+1) = 2/3, q1 2/(2+2+4) = 1/4
    assert s["abs_all"] == pytest.approx((2 / 3 + 1 / 4) / 2, abs=1e-15)
    # abs_true: q0 3/(3+1), q1 0/(0+4)
    assert s["abs_true"] == pytest.approx((3 / 4 + 0) / 2, abs=1e-15)
    # signed_true: (3 + 0) / ((3 + 1) + (0 + 4))
    assert s["signed_true"] == pytest.approx(3 / 8, abs=1e-15)


def test_pairwise_auc_hand_computed():
    s = np.array([3.0, 1.0, 2.0, 1.0, 0.0])
    assert tm.pairwise_auc(s, [0], [1, 2, 4]) == 1.0
    # true {2, 3} vs {1, 4}: 2>1, 2>4, 3=1 (½), 3>4 → 3.5 / 4
    assert tm.pairwise_auc(s, [2, 3], [1, 4]) == 3.5 / 4
    assert tm.pairwise_auc(s, [4], [0, 1]) == 0.0
    with pytest.raises(ValueError):
        tm.pairwise_auc(s, [], [1])


def test_draw_candidates_and_phrases():
    ids = [f"d{i}" for i in range(50)]
    c = tm.draw_candidates(["d1", "d2"], ["d3", "d4"], ids, ["d2", "d5", "d6"],
                           np.random.default_rng(0), 10, 2)  # fmt: skip
    assert {"d1", "d2", "d3", "d4", "d5", "d6"} <= set(c) and c == sorted(set(c))
    assert 10 <= len(c) <= 16  # 6 fixed ∪ 10 random (which may repeat fixed ones)
    assert tm.contains_phrase("Born in Ostrava Minor.", "ostrava minor")
    assert not tm.contains_phrase("The Lumoran coast", "Lumora")


def _tiny_shipped(tmp_path):
    """A tiny world with an untrained 1-layer GPT-NeoX pair saved like the shipped data."""
    import torch

    from msif_lite.world import lm
    from msif_lite.world.generate import WorldConfig, make_world

    world = make_world(WorldConfig(n_entities=6, docs_per_fact=2, vocab_size=300))
    world.save(tmp_path / "world")
    tok = lm.train_tokenizer(world, tmp_path / "world" / "tokenizer")
    preset = lm.ModelPreset("tiny", "gpt-neox", 1, 32, 2, 64, 128)
    pt = lm.build_model(preset, len(tok), 0, tok)
    meta = lm.CheckpointMeta("tiny", 0, "pretrained", None, world.content_hash,
                             lm.tokenizer_hash(tok), lm.config_hash(pt.config),
                             world.preset)  # fmt: skip
    lm.save_checkpoint(pt, tmp_path / "ck" / "pretrained", meta, tok)
    with torch.no_grad():
        for p in pt.parameters():
            p.add_(0.01 * torch.randn_like(p))
    meta = lm.CheckpointMeta(**{**meta.__dict__, "stage": "finetuned", "alpha": 0.01})
    lm.save_checkpoint(pt, tmp_path / "ck" / "finetuned", meta, tok)
    return world


@pytest.mark.slow
def test_fast_bench_end_to_end(tmp_path, monkeypatch):
    from msif_lite.attribution.methods import METHODS
    from msif_lite.bench import fact_tracing as ft

    world = _tiny_shipped(tmp_path)
    monkeypatch.setenv("MSIF_FAST", "1")
    out = tmp_path / "results"
    out.mkdir()
    result = ft.main(["--world", str(tmp_path / "world"), "--checkpoints", str(tmp_path / "ck"),
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])  # fmt: skip
    assert result.json_path == out / "fact_tracing.json"
    r = json.loads((out / "fact_tracing.json").read_text())
    keys = {"mrr_mean", "mrr_std", "recall10_mean", "recall10_std"}
    # checkpoints / mentions: not in this world; whitening: any EK-FAC Attributor provides it
    needs = {n for n, m in METHODS.items() if m.requires() - {"whitening"}}
    assert set(r["methods"]) == set(METHODS) - needs  # every other registered method
    sweeps = [r["methods"], r["damping_sweep"], r["alpha_sweep"],
              {k: r["layers"][k] for k in ("all", "mlp")},
              {k: v for k, v in r["embedding_candidates"].items() if k != "candidate_recall"}]
    for d in sweeps:
        for v in d.values():
            assert keys <= set(v) and 0 <= v["mrr_mean"] <= 1 and 0 <= v["recall10_mean"] <= 1
    assert set(r["damping_sweep"]) == {"0.001", "heuristic"}
    assert set(r["alpha_sweep"]) == {"1", "10"}
    assert r["alpha_sweep"]["10"]["alpha"] == pytest.approx(0.1)
    assert 0 <= r["layers"]["mlp_share"]["abs_all"] <= 1
    # the same multi-stage metrics computed three ways: from the per-layer scores summed
    # (layers.all), from the method's finished score (methods) and re-preconditioned in
    # float64 by the sweeps at the trained α and the heuristic λ_pt
    for other in (r["methods"]["multi_stage"], r["alpha_sweep"]["1"],
                  r["damping_sweep"]["heuristic"]):  # fmt: skip
        for k in keys:
            assert r["layers"]["all"][k] == pytest.approx(other[k], abs=1e-9), k
    assert r["setup"]["n_queries_per_draw"] == min(6, len(world.queries))
    assert r["setup"]["pools"]["n_draws"] == 3 and r["setup"]["fast"] is True
    c = r["checks"]
    assert c["bf16_vs_fp32_spearman_min[heuristic]"] > 0.9
    assert c["bf16_vs_fp32_spearman_min[0.001]"] > 0.9
    assert c["mlp_only_vs_mlp_part_max_rel_err"] < 1e-3
    for name in ("methods", "damping", "alpha"):
        assert (out / f"fact_tracing_{name}.png").stat().st_size > 1000
    assert "| multi_stage |" in (out / "fact_tracing.md").read_text()
    auc = r["analysis"]["auc_vs_distractors"]["multi_stage"]
    assert auc and all(0 <= v <= 1 for v in auc.values())
    assert 0 <= r["analysis"]["true_source_score_positive"]["grad_dot"] <= 1

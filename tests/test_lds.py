"""Counterfactual evaluation (notebook 10): the LDS metric on problems with a known answer,
deterministic subsets and retrains, the shipped ground truth's refusals, and
`msif-lite bench lds` end to end on a tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from msif_lite.eval.metrics import lds, subset_predictions
from msif_lite.eval.retraining import GroundTruth, RetrainConfig, retrain, subset_masks
from msif_lite.world import generate, lm


def test_lds_is_one_for_an_exact_linear_datamodel_and_near_zero_for_random_scores():
    g = torch.Generator().manual_seed(0)
    masks = subset_masks(40, 64, 0.5, seed=1)
    scores = torch.randn(5, 40, generator=g, dtype=torch.float64)
    # the linear datamodel m_j(q) = c_q − Σ_{z∈S_j} I(z, q), exactly (any monotone map too)
    measured = 3.0 + subset_predictions(scores, masks)
    assert torch.allclose(lds(scores, masks, measured), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(lds(scores, masks, measured.exp()), torch.ones(5, dtype=torch.float64))
    # the sign convention: helpful documents (positive I) lower m, so flipping the scores'
    # sign gives −1
    assert torch.allclose(lds(-scores, masks, measured), -torch.ones(5, dtype=torch.float64))
    rand = torch.randn(5, 40, generator=g, dtype=torch.float64)
    r = lds(rand, masks, measured)
    assert r.abs().mean() < 0.25, r
    # constant scores predict nothing: 0, not NaN
    assert lds(torch.zeros(5, 40), masks, measured).eq(0).all()
    with pytest.raises(ValueError, match="every document"):
        lds(scores[:, :10], masks, measured)


def test_subset_masks_are_seeded_half_sized_and_prefix_stable():
    a, b = subset_masks(200, 8, 0.5, 0), subset_masks(200, 8, 0.5, 0)
    assert torch.equal(a, b) and (a.sum(1) == 100).all()
    assert torch.equal(subset_masks(200, 3, 0.5, 0), a[:3])  # more subsets: same first ones
    assert not torch.equal(subset_masks(200, 8, 0.5, 1), a)


def test_retrain_is_deterministic_and_ground_truth_refuses_another_world(tiny_pipeline, tmp_path):
    world = generate.make_world("lds-tiny", 0)
    tok = lm.train_tokenizer(world)
    cfg = RetrainConfig(tiny_pipeline, n_subsets=2, n_noise=1)
    keep = subset_masks(len(world.documents), 1, 0.5, 0)[0].tolist()
    a, b = (retrain(world, tok, keep, cfg, 0) for _ in range(2))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    c = retrain(world, tok, [True] * len(keep), cfg, 0)  # another subset: other weights
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    gt = GroundTruth([d.doc_id for d in world.documents], [q.fact_id for q in world.queries],
                     torch.tensor([keep, keep]), torch.zeros(2, len(world.queries)),
                     torch.zeros(2, len(world.queries), dtype=torch.bool),
                     torch.zeros(1, len(world.queries)), torch.zeros(len(world.queries)),
                     {"world_hash": world.content_hash,
                      "tokenizer_hash": lm.tokenizer_hash(tok)}, 1.0)  # fmt: skip
    path = gt.save(tmp_path / "gt.json")
    back = GroundTruth.load(path, world, tok)
    assert torch.equal(back.masks, gt.masks)
    other = generate.make_world("lds-tiny", 1)
    with pytest.raises(ValueError, match="another world"):
        GroundTruth.load(path, other, tok)
    with pytest.raises(ValueError, match="another tokenizer"):
        GroundTruth.load(path, world, lm.train_tokenizer(other))


@pytest.mark.slow
def test_bench_lds_end_to_end(tiny_pipeline, tmp_path, monkeypatch):
    from msif_lite.bench import lds as bench

    cfg = bench.LDSBenchConfig(RetrainConfig(tiny_pipeline, n_subsets=4, n_noise=2),
                               removal_queries=2, removal_methods=("multi_stage", "random"),
                               methods=("multi_stage", "grad_dot", "bm25", "random"))
    monkeypatch.setattr(bench, "FAST", cfg)
    monkeypatch.setenv("MSIF_FAST", "1")
    out = tmp_path / "results"
    assert bench.main(["--out", str(out), "--cache-dir", str(tmp_path / "cache")]).json_path \
        == out / "lds.json"
    r = json.loads((out / "lds.json").read_text())["worlds"]["lds-tiny"]
    assert set(r["methods"]) == {"multi_stage", "grad_dot", "bm25", "random"}
    for v in r["methods"].values():
        assert -1 <= v["lds_mean"] <= 1 and v["lds_sem"] >= 0 and 0 <= v["mrr_all_docs"] <= 1
    assert r["n_subsets"] == 4 and r["n_noise"] == 2
    assert set(r["top_k_removal"]) == {"multi_stage", "random", "true_sources", "none"}
    assert r["top_k_removal"]["true_sources"]["n_removed"] == 2 * 2  # 2 targets × 2 sources
    assert (out / "lds.png").stat().st_size > 1000
    assert "noise ceiling" in (out / "lds.md").read_text()
    # a rerun resumes: nothing is retrained again
    rows = (tmp_path / "cache" / "partial-lds-tiny.jsonl").read_text()
    assert bench.main(["--out", str(out), "--cache-dir", str(tmp_path / "cache")]).json_path \
        == out / "lds.json"
    assert (tmp_path / "cache" / "partial-lds-tiny.jsonl").read_text() == rows
    # a removal set already in lds.json (same documents, same seed) is reused, not retrained
    removal = tmp_path / "cache" / "removal-lds-tiny.jsonl"
    removal.unlink()
    assert bench.main(["--out", str(out), "--cache-dir", str(tmp_path / "cache")]).json_path \
        == out / "lds.json"
    again = json.loads((out / "lds.json").read_text())["worlds"]["lds-tiny"]["top_k_removal"]
    assert all(v.get("reused") for v in again.values()) and not removal.exists()
    assert {n: v["dm_targets_mean"] for n, v in again.items()} == \
        {n: v["dm_targets_mean"] for n, v in r["top_k_removal"].items()}  # fmt: skip


@pytest.mark.slow
def test_bench_variants_end_to_end(tiny_pipeline, tmp_path, monkeypatch):
    """The variants benchmark on the tiny world: LDS, MRR and cost of every variant, leave-
    top-k-out reusing nothing it cannot, the diagnosis, the issue's JSON schema."""
    from msif_lite.bench import lds as bench
    from msif_lite.bench import variants

    cfg = bench.LDSBenchConfig(RetrainConfig(tiny_pipeline, n_subsets=4, n_noise=2),
                               removal_queries=2, removal_methods=("random",),
                               methods=("multi_stage", "random"))  # fmt: skip
    monkeypatch.setattr(bench, "FAST", cfg)
    monkeypatch.setenv("MSIF_FAST", "1")
    gt = tmp_path / "data" / "lds" / "lds-tiny.json"
    out, cache = tmp_path / "results", str(tmp_path / "cache")
    bench.main(["--out", str(out), "--cache-dir", cache, "--ground-truth", str(gt)])
    vcfg = variants.VariantsConfig(pipelines=("lds-tiny",), diagnosis_only=(),
                                   removal_methods=("multi_stage", "multi_stage_token_positive",
                                                    "tracin", "random", "bm25"),
                                   removal_queries=2, checkpoint_every=3)  # fmt: skip
    monkeypatch.setattr(variants, "VariantsConfig", lambda: vcfg)
    assert variants.main(["--out", str(out), "--cache-dir", cache]).name == "variants"
    r = json.loads((out / "variants.json").read_text())
    assert {"top_k_removal", "lds", "mrr", "settings", "worlds"} <= set(r)
    names = set(variants.VARIANTS) | {m.name for m in variants.INGREDIENTS}
    assert set(r["lds"]) == names and set(r["mrr"]) == names
    assert {"multi_stage", "tracin", "true_sources", "random", "none"} <= set(r["top_k_removal"])
    assert r["top_k_removal"]["random"].get("reused")  # bench lds already removed that set
    for v in r["top_k_removal"].values():
        assert {"dm_targets_mean", "dm_others_mean"} <= set(v)
    w = r["worlds"]["lds-tiny"]
    assert w["settings"]["tracin_checkpoints"] == [3, 6]
    assert set(w["diagnosis"]["at_theta_pt"]) == {"true_sources", "outranking", "all_documents"}
    assert w["goal"]["best_gradient_method"] in variants.GRADIENT_REMOVALS
    assert "Diagnosis" in (out / "variants.md").read_text()
    assert (out / "variants.png").stat().st_size > 1000

"""`msif-lite bench accuracy` (Experiment 1) end to end on a tiny world and a tiny GPT-NeoX.

Checks the JSON schema, that the ground truth is a converged CG solve (recomputed residual),
and orderings that hold by construction: CG's own iterates approach the ground truth, so
the larger CG budget agrees with it at least as well as the smaller one.
"""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from msif_lite.bench import accuracy_diagnosis, accuracy_trend  # noqa: E402
from msif_lite.bench.accuracy import main  # noqa: E402
from msif_lite.bench.accuracy_run import choose_documents  # noqa: E402
from msif_lite.engine.curvature import CURVATURES  # noqa: E402
from msif_lite.world.generate import make_world  # noqa: E402
from msif_lite.world.lm import (  # noqa: E402
    CheckpointMeta,
    ModelPreset,
    build_model,
    config_hash,
    save_checkpoint,
    tokenizer_hash,
    train_tokenizer,
)
from msif_lite.world.training import TrainConfig, pretrain  # noqa: E402

TINY = ModelPreset("tiny", "gpt-neox", n_layers=1, hidden=32, n_heads=2, intermediate=64)
FITTED = [n for n, c in CURVATURES.items() if c.needs_factors]  # ekfac, kfac, diagonal, …
METHODS = (*FITTED, *(f"{n}_draws2" for n in FITTED),  # MSIF_FAST: --label-draws 2
           "ekfac_mlp", "grad_dot", "cg_2", "cg_12", "lissa_5", "lissa_20")
FIELDS = ("spearman_mean", "spearman_std", "pearson_mean", "fit_s", "score_s", "peak_mem_mb")


@pytest.fixture(scope="module")
def tiny_shipped(tmp_path_factory):
    """world/ + checkpoints/{pretrained,finetuned} laid out as load_shipped expects."""
    root = tmp_path_factory.mktemp("shipped")
    world = make_world("ci-fast", 0)
    world.save(root / "world")
    tok = train_tokenizer(world, root / "world" / "tokenizer")
    model = build_model(TINY, len(tok), 0, tok)
    pretrain(model, tok, world, TrainConfig(steps=30, lr=3e-3, warmup=5, progress=False))
    meta = CheckpointMeta("tiny", 0, "pretrained", None, world.content_hash,
                          tokenizer_hash(tok), config_hash(model.config), world.preset)  # fmt: skip
    save_checkpoint(model, root / "ck" / "pretrained", meta, tok)
    ft = CheckpointMeta(**{**meta.__dict__, "stage": "finetuned", "alpha": 0.01})
    save_checkpoint(model, root / "ck" / "finetuned", ft, tok)
    return root, world


def test_candidates_include_the_true_sources_and_are_deterministic(tiny_shipped):
    _, world = tiny_shipped
    q, cands, fit = choose_documents(world, 3, 30, 8, seed=0)
    assert len(q) == 3 and len(cands) == 30 and len(fit) == 8
    assert {d for x in q for d in x.source_doc_ids} <= set(cands)
    assert (q, cands, fit) == choose_documents(world, 3, 30, 8, seed=0)


def test_accuracy_bench_end_to_end(tiny_shipped, tmp_path, monkeypatch):
    root, _ = tiny_shipped
    monkeypatch.setenv("MSIF_FAST", "1")
    argv = ["--world", str(root / "world"), "--checkpoints", str(root / "ck"),
            "--out", str(tmp_path), "--queries", "3", "--candidates", "30", "--fit", "8",
            "--cg", "2", "12", "--lissa", "5", "20", "--power-iters", "5", "--quiet"]  # fmt: skip
    result = main(argv)
    assert result.json_path == tmp_path / "accuracy.json" and result.md_path.is_file()
    out = json.loads((tmp_path / "accuracy.json").read_text())
    assert set(out) >= {"methods", "ground_truth", "setup", "paper", "environment"}
    assert set(result.data["methods"]) == set(out["methods"])
    assert set(out["methods"]) == set(METHODS)
    for name, r in out["methods"].items():
        for f in FIELDS:
            assert isinstance(r[f], float) and math.isfinite(r[f]), (name, f)
        assert -1.0 <= r["spearman_mean"] <= 1.0 and len(r["spearman_per_query"]) == 3
    for name in ("cg_2", "cg_12", "lissa_5", "lissa_20"):
        assert out["methods"][name]["fit_s"] == 0.0  # iterative: all the cost is in score_s
    gt = out["ground_truth"]
    assert gt["all_converged"] and max(gt["relative_residual"]) < gt["converged_below"] <= 1e-6
    assert len(gt["iterations"]) == 3 and max(gt["iterations"]) <= gt["max_iter"]
    m = out["methods"]
    assert m["cg_12"]["spearman_mean"] >= m["cg_2"]["spearman_mean"] - 1e-9
    s = out["setup"]
    assert s["n_queries"] == 3 and s["n_candidates"] == 30 and s["n_fit_sequences"] == 8
    assert s["damping"] > 0 and s["lissa_scale"] >= s["lambda_max"] + s["damping"]
    assert out["paper"]["spearman"]["ekfac"] == 0.612
    md = (tmp_path / "accuracy.md").read_text()
    assert "| ekfac |" in md and "0.612" in md and "Ground truth" in md


def test_accuracy_bench_block_diagonal_reference(tiny_shipped, tmp_path, monkeypatch):
    """--block-truth adds the exact block-diagonal solve and scores every method against it."""
    root, _ = tiny_shipped
    monkeypatch.setenv("MSIF_FAST", "1")
    argv = ["--world", str(root / "world"), "--checkpoints", str(root / "ck"),
            "--out", str(tmp_path), "--queries", "2", "--candidates", "20", "--fit", "4",
            "--cg", "2", "4", "--lissa", "3", "6", "--power-iters", "4", "--block-truth",
            "--label-draws", "3",
            "--quiet"]  # fmt: skip
    main(argv)
    m = json.loads((tmp_path / "accuracy.json").read_text())["methods"]
    assert {"block_exact", "ekfac", "ekfac_mlp", "kfac", "grad_dot", "cg_4", "lissa_6",
            "ekfac_draws3", "kfac_draws3"} <= set(m)
    assert m["ekfac_draws3"]["fit_s"] > 0
    assert m["block_exact"]["relative_residual_max"] < 1e-6
    assert m["block_exact"]["vs_block_exact"]["spearman_mean"] == pytest.approx(1.0)
    for r in m.values():
        assert -1.0 <= r["vs_block_exact"]["spearman_mean"] <= 1.0
    assert "Spearman vs block_exact" in (tmp_path / "accuracy.md").read_text()

    # `msif-lite bench accuracy-diagnosis` composes such runs into one table
    diag = accuracy_diagnosis
    payload = json.loads((tmp_path / "accuracy.json").read_text())
    for r in ("ekfac_draws4", "ekfac_draws32"):  # names of the diagnosis runs (draws 4, 32)
        payload["methods"][r] = payload["methods"]["ekfac_draws3"]
    text = diag.markdown({"block_mini": payload, "damping_5": payload})
    expected = payload["methods"]["block_exact"]["spearman_mean"]
    assert f"| {expected:.3f} ± " in text and f"costs {1 - expected:.2f} of Spearman" in text
    diag.plot({"block_mini": payload}, tmp_path / "diagnosis.png")
    assert (tmp_path / "diagnosis.png").stat().st_size > 1000


@pytest.mark.slow
def test_whole_corpus_trend_and_damping_sweep(tiny_shipped, tmp_path, monkeypatch):
    """`msif-lite bench accuracy-trend`: G and the factors on 8 documents and on the whole corpus
    (--fit 0), a damping sweep at 8; the composed accuracy.json has the headline on the whole
    corpus (settings), one trend row per size × method, the sweep and the gap to the paper."""
    root, world = tiny_shipped
    monkeypatch.setenv("MSIF_FAST", "1")
    trend = accuracy_trend
    bench = ["--world", str(root / "world"), "--checkpoints", str(root / "ck"), "--queries", "2",
             "--candidates", "20", "--cg", "2", "4", "--lissa", "3", "6", "--power-iters", "4",
             "--label-draws", "2", "--quiet"]  # fmt: skip
    argv = ["--sizes", "8", "0", "--damping-rel", "300", "--sweep", "3000", "--sweep-size", "8",
            "--runs", str(tmp_path / "runs"), "--out", str(tmp_path), "--", *bench]  # fmt: skip
    trend.main(argv)
    # an ingredient split from a separate --block-truth run, composed without rerunning
    block = ["--fit", "8", "--damping-rel", "300", "--block-truth", "--out",
             str(tmp_path / "block8"), *bench]  # fmt: skip
    main(block)
    result = trend.main([*argv[:-len(bench) - 1], "--compose-only", "--ingredients",
                         str(tmp_path / "block8")])  # fmt: skip
    assert result.name == "accuracy" and result.json_path == tmp_path / "accuracy.json"
    out = json.loads((tmp_path / "accuracy.json").read_text())
    s = out["settings"]
    assert not out["partial"] and s["whole_corpus"]
    assert s["n_fit_docs"] == s["n_corpus_docs"] == len(world.documents)
    assert max(s["ground_truth_relative_residual"]) < 1e-6
    assert s["damping_rel_to_mean_eig"] == pytest.approx(300)
    sizes = {r["n_fit_docs"] for r in out["trend"]}
    assert sizes == {8, len(world.documents)}
    for n in sizes:
        assert {r["method"] for r in out["trend"] if r["n_fit_docs"] == n} >= {
            "ekfac", "kfac", "ekfac_draws2", "grad_dot", "cg_2", "cg_4", "lissa_3", "lissa_6"}
    lams = sorted({round(r["damping_rel_to_mean_eig"]) for r in out["damping_sweep"]})
    assert lams == [300, 3000]
    assert out["gap"]["paper_ekfac"] == 0.612 and "margin_over_grad_dot" in out["gap"]
    mp = out["gap"]["margin_paired"]
    assert mp["n"] == 2 and mp["mean"] == pytest.approx(out["gap"]["margin_over_grad_dot"])
    ing = {r["method"]: r for r in out["ingredients"]}
    assert {"block_exact", "ekfac", "grad_dot"} <= set(ing)
    assert ing["block_exact"]["spearman_vs_block_exact"] == pytest.approx(1.0)
    assert out["gap"]["ingredients"]["ekfac"]["vs_block_exact"] == pytest.approx(
        ing["ekfac"]["spearman_vs_block_exact"])
    assert "## Ingredients" in (tmp_path / "accuracy.md").read_text()
    assert (tmp_path / "runs" / "fit8_lam300" / "partial.json").is_file()
    assert (tmp_path / "accuracy_trend.png").is_file()
    assert "## Trend" in (tmp_path / "accuracy.md").read_text()


def test_preconditioned_ground_truth_agrees_with_plain_cg(tiny_shipped, tmp_path, monkeypatch):
    """--precondition ekfac (PCG) and plain CG solve the same system: converged residuals
    below 1e-6 and the same scores (every method's Spearman vs each truth equal to 1e-3)."""
    root, _ = tiny_shipped
    monkeypatch.setenv("MSIF_FAST", "1")
    res = {}
    for pre in ("none", "ekfac"):
        argv = ["--world", str(root / "world"), "--checkpoints", str(root / "ck"),
                "--out", str(tmp_path / pre), "--queries", "2", "--candidates", "20", "--fit",
                "6", "--cg", "2", "4", "--lissa", "3", "6", "--power-iters", "4",
                "--precondition", pre, "--tol", "1e-8", "--quiet"]  # fmt: skip
        main(argv)
        res[pre] = json.loads((tmp_path / pre / "accuracy.json").read_text())
        assert max(res[pre]["ground_truth"]["relative_residual"]) < 1e-6
    for name, r in res["none"]["methods"].items():
        other = res["ekfac"]["methods"][name]["spearman_mean"]
        assert r["spearman_mean"] == pytest.approx(other, abs=1e-3), name

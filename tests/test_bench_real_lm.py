"""`msif-lite bench real-lm` end to end in fast mode on a tiny local Llama (GQA, tied
embeddings: the real model's shape) and a small real-language world — plumbing, not a
result: the JSON schema, one retrain per row, Δm = 0 for the retrain without removal
(training is deterministic for a seed), and the cache (a second run retrains nothing)."""

from __future__ import annotations

import json

import pytest
from test_real_lm import SMALL, save_tiny_base

from msif_lite.bench import real_lm as bench
from msif_lite.world import real_text as rt


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-lm-bench")
    save_tiny_base(rt.make_real_world(rt.harvest(), SMALL), root)
    return root


def _args(root) -> list[str]:
    return ["--model", str(root / "base"), "--world-dir", str(root / "world"), "--layers", "1",
            "--pipeline-cache", str(root / "pipe"), "--cache-dir", str(root / "bench"),
            "--out", str(root / "out"), "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_fast_mode_end_to_end(tiny_inputs, monkeypatch):
    monkeypatch.setenv("MSIF_FAST", "1")
    res = bench.main(_args(tiny_inputs))
    p = json.loads(res.json_path.read_text())
    s = p["settings"]
    assert p["status"] == "complete" and s["fast"] and s["preset"] == "smoke"
    assert s["n_questions"] == len(p["questions"]) == 3 and s["tracked_layers"] == 3  # 1 block
    assert s["k"] == SMALL.name_first + SMALL.value_first
    assert set(p["methods"]) == set(bench.METHODS_MAIN)
    assert p["row_order"] == ["none", "true_sources", *bench.METHODS_MAIN, "noise"]
    assert set(p["removal"]) == set(p["row_order"])
    for name, m in p["methods"].items():
        assert 0 < m["mrr"] <= 1 and 0 <= m["recall_at_10"] <= 1, name
    for name, r in p["removal"].items():
        assert len(r["dm"]) == 3 and r["n_removed"] == len(r["removed"]), name
        assert r["n_removed"] <= 3 * s["k"] and r["retrain_s"] > 0
    assert p["removal"]["none"]["dm"] == [0.0, 0.0, 0.0]  # same seed, same data: same model
    assert p["removal"]["none"]["n_removed"] == p["removal"]["noise"]["n_removed"] == 0
    ts = p["removal"]["true_sources"]
    assert ts["true_sources_removed"] == ts["n_removed"] == sum(len(q["sources"])
                                                                for q in p["questions"])
    assert ts["dm_relative_to_true_sources"] == 1.0
    assert "Δm / true sources" in res.md_path.read_text()
    assert res.json_path.with_suffix(".png").is_file()
    # a second run finds every score set and retrain in the cache
    monkeypatch.setattr(bench, "run_stages", lambda *a, **k: pytest.fail("retrained again"))
    again = json.loads(bench.main(_args(tiny_inputs)).json_path.read_text())
    assert again["removal"]["multi_stage"]["dm"] == p["removal"]["multi_stage"]["dm"]

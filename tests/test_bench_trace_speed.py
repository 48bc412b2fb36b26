"""`msif-lite bench trace-speed` end to end on a tiny own pair (tests/test_own_model.py's
Llama): two variants in fresh processes, every stage timed, the plan beside the peaks, the
scores of the second variant compared with the first's."""

from __future__ import annotations

import json

import pytest
from test_own_model import save_pair, write_data

from msif_lite.bench.trace_speed import StageClock, parse_variant
from msif_lite.bench.trace_speed import main as bench_main


def test_stage_clock_counts_nested_stages_once():
    clock = StageClock()
    import time

    inner = clock.wrap("inner", lambda: time.sleep(0.05))

    def outer_fn():
        time.sleep(0.05)
        inner()

    clock.wrap("outer", outer_fn)()
    t = clock.take()
    assert 0.04 < t["inner"] < 0.2 and 0.04 < t["outer"] < 0.2  # outer excludes inner
    assert clock.take() == {}


def test_variant_parsing():
    assert parse_variant("f32:--eigh-dtype float32") == ("f32", ["--eigh-dtype", "float32"])
    assert parse_variant("defaults:") == ("defaults", [])
    with pytest.raises(ValueError, match="NAME:FLAGS"):
        parse_variant("--eigh-dtype float32")


def test_bench_runs_two_variants_on_an_own_pair(tmp_path, monkeypatch):
    root = tmp_path / "pair"
    pt, ft = save_pair(root, "llama")
    corpus, data = write_data(root)
    pair = (f"--pretrained {pt} --finetuned {ft} --corpus {corpus} --finetune-data {data} "
            "--alpha 0.01")
    argv = ["--pair", pair, "--question", "Where was Ada Lovelace born?",
            "--question", "Who wrote the first program?", "--threads", "1",
            "--candidates", "5", "--variant", "one:--eigh-workers 1",
            "--variant", "f32:--eigh-dtype float32 --eigh-workers 2 --cache-dtype bfloat16",
            "--out", str(tmp_path / "out")]  # fmt: skip
    res = bench_main(argv)
    data = json.loads(res.json_path.read_text())
    one, f32 = data["rows"]
    for r in (one, f32):
        s = r["session"]
        assert set(s["fits"]) == {"pretrained", "finetuned"}
        for f in s["fits"].values():
            assert f["covariance_s"] > 0 and f["eigendecomposition_s"] > 0
            assert f["peak_above_entry_gib"] >= 0
        for q in ("q1", "q2"):
            st = s[q]["stages_s"]
            assert {"answer", "candidate retrieval", "query preconditioning",
                    "evidence"} <= set(st)  # fmt: skip
            assert all(v >= 0 for v in st.values())
            assert sum(st.values()) <= s[q]["wall_s"] + 1e-6
        assert r["first_question_s"] > s["q1"]["wall_s"] > 0
        assert r["later_question_command_s"] > 0 and len(s["q1_scores"]) == 5
        assert s["plan"]["pretrained"]["fit_gib"] > 0
    # float32 eigendecompositions barely move the ranking of 5 candidates
    assert one["spearman_vs_reference"] == pytest.approx(1.0)  # the first is the reference
    assert f32["spearman_vs_reference"] > 0.8
    # --resume keeps every variant measured with the same settings: nothing runs again
    from msif_lite.bench import trace_speed

    def refuse(*_):
        raise AssertionError("a variant ran again")

    monkeypatch.setattr(trace_speed, "run_variant", refuse)
    again = json.loads(bench_main([*argv, "--resume"]).json_path.read_text())
    assert [r["session"]["q1_scores"] for r in again["rows"]] == [
        r["session"]["q1_scores"] for r in data["rows"]]
    with pytest.raises(AssertionError, match="ran again"):  # other settings: measured anew
        bench_main([*argv, "--resume", "--candidates", "4"])
    md = res.md_path.read_text()
    assert "first question" in md and "Memory plan against the measured peaks" in md
    assert "--eigh-dtype float32" in md


def test_pair_without_questions_is_refused(tmp_path):
    with pytest.raises(ValueError, match="two --question"):
        bench_main(["--pair", "--pretrained x", "--out", str(tmp_path)])

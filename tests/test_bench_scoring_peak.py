"""`msif-lite bench scoring-peak`: the results files composed from a small fake payload, and
the benchmark's smallest row end to end in fast mode (one fresh subprocess, ~20 s): the
plan's ratio to the measured peak of `Attributor.scores` is reported and within ±20 %."""

from __future__ import annotations

import json

import pytest

from msif_lite.bench import discover
from msif_lite.bench import scoring_peak as sp
from msif_lite.bench.common import finish
from msif_lite.cli import main

BLOOM = {"batch": "4 × 512", "query_rank": 32, "predicted_gib": 22.2, "below_24_gib": True,
         "peak_phase": "streamed (over the disk budget)", "phase_gib": 14.3,
         "factors_gib": 7.88, "candidate_activations_gib": 13.8}  # fmt: skip


def _row(candidates: str, rank, ratio: float) -> dict:
    return {"size": "tiny", "candidates": candidates, "query_rank": rank, "predicted_gib": ratio,
            "measured_gib": 1.0, "ratio": ratio, "predicted_phase": "candidate chunk",
            "held_gib": 0.01, "scores_sum": 1.5, "seconds": 1.0}  # fmt: skip


def test_results_files_from_a_fake_payload(tmp_path):
    """JSON: the payload + environment; markdown: the count within the target, the rows, the
    BLOOM-560m prediction and the dense path's measured numbers (kept as text: the code that
    measured them is gone)."""
    res = {"rows": [_row("stored", None, 1.1), _row("streamed", 8, 0.7)],
           "bloom560m_predicted": [BLOOM], "sizes": [],
           "target": sp.TARGET, "method": sp.METHOD, "historical": sp.HISTORICAL,
           "measured_by": "a fake", "total_s": 3.0}  # fmt: skip
    out = finish("scoring_peak", res, sp.markdown(res), tmp_path, quiet=True)
    data = json.loads(out.json_path.read_text())
    assert [r["ratio"] for r in data["rows"]] == [1.1, 0.7] and "environment" in data
    md = out.md_path.read_text()
    assert "1/2 rows within ±20%" in md and "(0.70–1.10×)" in md
    assert "| tiny | streamed | 8 | 0.7 | 1 | 0.7 | candidate chunk |" in md
    assert "dense" in md and "23–50 % measured" in md and "36.1 GiB dense" in md
    assert "| 4 × 512 | 32 | 22.2 | True | streamed (over the disk budget) |" in md
    assert "old_gib" not in md and "dense (old)" not in md


def test_plan_row_refuses_inputs_of_another_length():
    size = sp.FAST_SIZES[0]
    m = {"doc_tokens": [size.seq_len + 1], "query_tokens": [20], "streams": True,
         "chunk_mb": 1.0, "measured_bytes": 1, "held_bytes": 0, "scores_sum": 0.0}  # fmt: skip
    with pytest.raises(RuntimeError, match="one length"):
        sp.plan_row(size, True, None, m)
    with pytest.raises(RuntimeError, match="streams"):
        sp.plan_row(size, False, None, {**m, "doc_tokens": [size.seq_len]})


def test_smallest_row_end_to_end_fast(tmp_path, monkeypatch, capsys):
    """The tiny size, streamed candidates, rank 8: planned within ±20 % of the measured peak.
    (The BLOOM-560m prediction is stubbed: ~20 s of activation calibration, and
    test_memory.py checks those plans.)"""
    monkeypatch.setenv("MSIF_FAST", "1")
    monkeypatch.setattr(sp, "bloom560m_prediction", lambda: [BLOOM])
    assert "scoring-peak" in discover()
    assert main(["bench", "scoring-peak", "--out", str(tmp_path), "--candidates", "streamed",
                 "--ranks", str(sp.RANK)]) == 0  # fmt: skip
    r = json.loads((tmp_path / "scoring_peak.json").read_text())
    assert r["environment"]["mode"] == "fast" and len(r["rows"]) == 1
    row = r["rows"][0]
    assert (row["size"], row["candidates"], row["query_rank"]) == ("tiny", "streamed", sp.RANK)
    assert row["measured_gib"] > row["held_gib"] > 0
    assert abs(row["ratio"] - 1) < sp.TARGET, row
    assert "1/1 rows within ±20%" in (tmp_path / "scoring_peak.md").read_text()

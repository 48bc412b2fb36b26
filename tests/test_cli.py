"""Every `msif-lite` subcommand answers --help, and the benchmarks without a test of their
own run end to end in fast mode (the others: test_bench_*.py, test_lds.py)."""

from __future__ import annotations

import json

import pytest

from msif_lite.cli import BENCHES, main


@pytest.mark.parametrize("argv", [["--help"], ["trace", "--help"], ["methods", "--help"],
                                  ["world", "--help"], ["bench", "--help"]]
                         + [["bench", name, "--help"] for name in sorted(BENCHES)])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_bench_engine_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_FAST", "1")
    monkeypatch.setenv("MSIF_BENCH_REPEATS", "1")
    assert main(["bench", "engine", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "engine_overhead.json").read_text())
    assert r["fit_s"] > 0 and r["fit_over_fwd_bwd"] > 0
    assert "EK-FAC fit total" in (tmp_path / "engine_overhead.md").read_text()


def test_bench_retrieval_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_FAST", "1")
    assert main(["bench", "retrieval", "--preset", "lds", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "retrieval_recall.json").read_text())
    assert all(0 <= v <= 1 for rec in r["recall"].values() for v in rec.values())


def test_world_command_runs_the_pipeline(tmp_path):
    out = str(tmp_path / "w")
    assert main(["world", "--preset", "lds-fast", "--out", out, "--no-progress"]) == 0
    assert (tmp_path / "w" / "checkpoints" / "finetuned" / "msif_meta.json").exists()


def test_trace_help_lists_the_own_pair_options(capsys):
    with pytest.raises(SystemExit):
        main(["trace", "--help"])
    out = capsys.readouterr().out
    for option in ("--pretrained", "--finetuned", "--corpus", "--finetune-data", "--alpha",
                   "--template", "--context-length", "--device"):  # fmt: skip
        assert option in out, option
    assert "Question: {question}\\nAnswer: {answer}" in out  # the default template, shown


def test_a_bench_that_returns_its_results_exits_zero(monkeypatch):
    """memory-plan, projection and bloom560m return their results dict from main()."""
    import sys
    import types

    fake = types.ModuleType("msif_fake_bench")
    fake.main = lambda argv: {"rows": [], "argv": argv}
    monkeypatch.setitem(sys.modules, "msif_fake_bench", fake)
    monkeypatch.setitem(BENCHES, "fake", "msif_fake_bench")
    assert main(["bench", "fake", "--out", "x"]) == 0
    assert {"memory-plan", "projection"} <= set(BENCHES)

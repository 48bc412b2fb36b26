"""Every `msif-lite` subcommand answers --help, every module of msif_lite/bench that defines
BENCH is a `msif-lite bench` command, and the benchmarks without a test of their own run end
to end in fast mode (the others: test_bench_*.py, test_lds.py, test_memory.py)."""

from __future__ import annotations

import json
import pkgutil
import sys

import pytest

import msif_lite.bench
from msif_lite.bench import discover
from msif_lite.bench.common import Benchmark, BenchResult
from msif_lite.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["trace", "--help"], ["methods", "--help"],
                                  ["world", "--help"], ["bench", "--help"]]
                         + [["bench", name, "--help"] for name in discover()])
def test_every_subcommand_has_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_benchmarks_are_discovered_from_their_modules(capsys):
    """One rule: a module with BENCH is a benchmark; bench --help lists each with its help."""
    benches = discover()
    assert {"engine", "accuracy", "accuracy-trend", "accuracy-diagnosis", "accuracy-gpu",
            "exact-speed", "fact-tracing", "retrieval", "lds", "variants", "bloom560m",
            "projection", "distributed-fit"} <= set(benches)  # fmt: skip
    modules = {m.name for m in pkgutil.iter_modules(msif_lite.bench.__path__)}
    for b in benches.values():
        assert isinstance(b, Benchmark) and b.main.__module__.rpartition(".")[2] in modules
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    for name, b in benches.items():
        assert name in out and b.help.split()[0] in out


def test_an_unknown_benchmark_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "no-such-bench"])
    assert e.value.code == 2 and "engine" in capsys.readouterr().err


def test_bench_engine_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_FAST", "1")
    monkeypatch.setenv("MSIF_BENCH_REPEATS", "1")
    assert main(["bench", "engine", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "engine_overhead.json").read_text())
    assert r["environment"]["mode"] == "fast"
    assert r["fit_s"] > 0 and r["fit_over_fwd_bwd"] > 0
    assert "EK-FAC fit total" in (tmp_path / "engine_overhead.md").read_text()


@pytest.mark.slow
def test_bench_retrieval_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MSIF_FAST", "1")
    assert main(["bench", "retrieval", "--preset", "lds", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "retrieval_recall.json").read_text())
    assert all(0 <= v <= 1 for rec in r["recall"].values() for v in rec.values())


def test_bench_distributed_fit_one_process(tmp_path):
    """The torchrun benchmark's one-process fallback: fit, scores and the --check against
    a one-process fit (identical in one process)."""
    assert main(["bench", "distributed-fit", "--n-seq", "8", "--check", "--out",
                 str(tmp_path)]) == 0  # fmt: skip
    r = json.loads((tmp_path / "distributed_fit.json").read_text())
    assert r["world"] == 1 and r["scores_shape"] == [4, 8] and r["max_rel_err_lambda"] < 1e-12


@pytest.mark.slow
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


def test_config_options_parse_into_the_configs():
    """Every generated option parses its own values, `X | None` and Literal fields included
    (choices from the Literal), and lands in the config `trace` builds."""
    from msif_lite.cli import _config, _parser

    a = _parser().parse_args(["trace", "q?", "--cache-dtype", "bfloat16", "--eigh-dtype",
                              "float32", "--eigh-workers", "3", "--cache-activations-mb", "512",
                              "--gradient-storage", "tokens", "--batch-order", "given",
                              "--gradient-cache-gb", "1.5"])  # fmt: skip
    cfg, _ = _config(a)
    f = cfg.factors
    assert (f.cache_dtype, f.eigh_dtype, f.eigh_workers, f.cache_activations_mb) == (
        "bfloat16", "float32", 3, 512.0)
    assert (cfg.gradient_storage, cfg.batch_order, cfg.gradient_cache_gb) == ("tokens", "given",
                                                                              1.5)
    with pytest.raises(SystemExit):
        _parser().parse_args(["trace", "q?", "--cache-dtype", "float16"])


def test_a_bench_returns_a_bench_result(monkeypatch, capsys):
    """The CLI passes the arguments through, exits 0 on a BenchResult and refuses anything
    else (one result type for every benchmark)."""
    seen = []

    def fake(argv):
        seen.append(argv)
        return BenchResult("fake", None, None, {"argv": argv})

    monkeypatch.setitem(discover(), "fake", Benchmark("fake", "a test benchmark", fake))
    assert main(["bench", "fake", "--out", "x"]) == 0 and seen == [["--out", "x"]]
    monkeypatch.setitem(discover(), "fake", Benchmark("fake", "", lambda argv: {"rows": []}))
    assert main(["bench", "fake"]) == 2
    assert "not a BenchResult" in capsys.readouterr().err


def test_discovery_takes_a_new_module_without_editing_anything(monkeypatch, tmp_path):
    """A new benchmark is one file: a module with BENCH in the package's path is found."""
    (tmp_path / "zz_fake_bench.py").write_text(
        "from msif_lite.bench.common import Benchmark, BenchResult\n"
        "BENCH = Benchmark('zz-fake', 'one new file', lambda argv: BenchResult("
        "'zz', None, None, {}))\n")
    monkeypatch.setattr(msif_lite.bench, "__path__", [*msif_lite.bench.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "msif_lite.bench.zz_fake_bench", raising=False)
    discover.cache_clear()
    try:
        assert "zz-fake" in discover()
        assert main(["bench", "zz-fake"]) == 0
    finally:
        discover.cache_clear()
        sys.modules.pop("msif_lite.bench.zz_fake_bench", None)


def test_trace_options_are_generated_from_the_config_fields():
    """Every AttributionConfig field that names a CLI flag is an option of `trace`, with the
    field's help; the values given reach the config, the others keep its defaults."""
    import dataclasses

    from msif_lite.attribution.config import AttributionConfig
    from msif_lite.cli import _parser
    from msif_lite.config import config_kwargs
    from msif_lite.engine.curvature import CURVATURES

    trace = next(a for a in _parser()._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith("trace"))  # fmt: skip
    flags = {o: act for act in trace._actions for o in act.option_strings}
    for f in dataclasses.fields(AttributionConfig):
        if "cli" in f.metadata:
            assert f.metadata["help"] in flags[f.metadata["cli"]].help
    assert flags["--curvature"].choices == list(CURVATURES)  # a new curvature appears here
    a = _parser().parse_args(["trace", "q", "--curvature", "diagonal", "--batch-size", "4"])
    kw = config_kwargs(AttributionConfig, a)
    assert kw == {"curvature": "diagonal", "batch_size": 4}
    cfg = AttributionConfig(**kw)
    assert (cfg.curvature, cfg.batch_size, cfg.cache_dir) == ("diagonal", 4, ".cache/msif")

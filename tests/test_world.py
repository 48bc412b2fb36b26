"""The fictional world: determinism, honest ground truth, tokenizer checks (Notebook 05)."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from msif_lite.world.generate import (  # noqa: E402
    RELATIONS,
    WORLD_PRESETS,
    WorldConfig,
    load_world,
    make_world,
    states_fact,
)
from msif_lite.world.lm import check_tokenizer, load_tokenizer, train_tokenizer  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "world" / "default"


def _bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    a = make_world("ci-fast", 0).save(tmp_path / "a")
    b = make_world("ci-fast", 0).save(tmp_path / "b")
    c = make_world("ci-fast", 1).save(tmp_path / "c")
    assert _bytes(a) == _bytes(b)
    assert _bytes(a)["documents.jsonl"] != _bytes(c)["documents.jsonl"]
    assert make_world("ci-fast", 0).content_hash != make_world("ci-fast", 1).content_hash


@pytest.mark.skipif(not SHIPPED.exists(), reason="shipped default world not generated yet")
def test_shipped_default_world_regenerates_byte_identically(tmp_path):
    world = make_world("default", 0)
    out = world.save(tmp_path / "w")
    shipped = _bytes(SHIPPED)
    for name, data in _bytes(out).items():
        assert shipped[name] == data, f"{name} differs: regenerate data/world/default"
    tok = train_tokenizer(world, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == (
        SHIPPED / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    check_tokenizer(load_tokenizer(SHIPPED / "tokenizer"), load_world(SHIPPED))
    assert len(tok) <= world.config.vocab_size


def test_round_trip_and_tamper_detection(tmp_path):
    world = make_world("ci-fast", 3)
    d = world.save(tmp_path / "w")
    back = load_world(d)
    assert back.documents == world.documents and back.queries == world.queries
    assert back.config == world.config and back.content_hash == world.content_hash
    p = d / "queries.jsonl"
    p.write_text(p.read_text().replace('"answer": "', '"answer": "X', 1))
    with pytest.raises(ValueError, match="make_world"):
        load_world(d)


@pytest.mark.parametrize("preset", ["ci-fast", "default"])
def test_query_sources_state_the_fact_and_nothing_else_does(preset):
    world = make_world(preset, 0)
    facts = {f.fact_id: f for f in world.facts}
    docs = {d.doc_id: d for d in world.documents}
    names = [e.name for e in world.entities]
    by_name: dict[str, list] = {}
    for d in world.documents:
        for n in names:
            if n.split()[-1] in d.text:  # last names are unique name parts: a superset
                by_name.setdefault(n, []).append(d)
    assert world.queries
    for q in world.queries:
        f = facts[q.fact_id]
        name = world.entity_name(f.entity_id)
        assert q.answer == f.value and name in q.prompt
        assert 2 <= len(q.source_doc_ids) == world.config.docs_per_fact
        for did in q.source_doc_ids:
            d = docs[did]
            assert d.kind == "bio" and q.fact_id in d.fact_ids
            assert name in d.text and q.answer in d.text
            assert states_fact(d.text, name, f.relation, f.value)
        name_re = re.compile(rf"\b{re.escape(name)}\b")
        for d in by_name.get(name, []):  # only documents mentioning the person can state it
            if d.doc_id in q.source_doc_ids:
                continue
            assert q.fact_id not in d.fact_ids
            assert not (name_re.search(d.text) and q.answer in d.text), (d, q)
            assert not states_fact(d.text, name, f.relation, f.value)
        assert not any(
            q.fact_id in d.fact_ids for d in world.documents if d.doc_id not in q.source_doc_ids
        )


def test_source_docs_use_different_paraphrases():
    world = make_world("default", 0)
    docs = {d.doc_id: d for d in world.documents}
    for q in world.queries[:60]:
        f = world.fact(q.fact_id)
        name = world.entity_name(f.entity_id)
        used = set()
        for did in q.source_doc_ids:
            for i, tmpl in enumerate(RELATIONS[f.relation][1]):
                if (
                    tmpl.format(name=name, v=f.value, a="an" if f.value[0] in "aeiou" else "a")
                    in docs[did].text
                ):
                    used.add(i)
        assert len(used) == len(q.source_doc_ids)


def test_query_facts_never_in_finetuning_data():
    world = make_world("default", 0)
    query_facts = {q.fact_id for q in world.queries}
    ft_facts = {qa.fact_id for qa in world.finetune_qa}
    assert query_facts and ft_facts and not query_facts & ft_facts
    query_names = {world.entity_name(world.fact(f).entity_id) for f in query_facts}
    for qa in world.finetune_qa:
        assert not any(n in qa.prompt for n in query_names)
    for d in world.documents:  # mixed-in QA documents are about fine-tuning entities only
        if d.kind == "qa":
            assert not any(n in d.text for n in query_names)
    assert len(world.queries) + len(world.finetune_qa) == len(world.facts)


def test_baselines_are_low():
    world = make_world("default", 0)
    sizes = [len(v) for v, _, _ in RELATIONS.values()]
    assert world.chance_accuracy() == pytest.approx(sum(1 / s for s in sizes) / len(sizes))
    assert world.chance_accuracy() < 0.1 and world.majority_accuracy() < 0.15


def test_config_validation_names_the_setting():
    with pytest.raises(ValueError, match="docs_per_fact"):
        WorldConfig(docs_per_fact=0)
    with pytest.raises(ValueError, match="finetune_fraction"):
        replace(WORLD_PRESETS["default"], finetune_fraction=1.0)
    with pytest.raises(ValueError, match="make_world|preset"):
        make_world("nope", 0)


def test_tokenizer_loads_with_autotokenizer_and_detects_other_corpus(tmp_path):
    from transformers import AutoTokenizer

    world = make_world("ci-fast", 0)
    train_tokenizer(world, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.eos_token is not None and tok.pad_token is not None
    assert tok.pad_token_id != tok.eos_token_id
    text = world.documents[0].text
    assert tok.decode(tok(text)["input_ids"]) == text
    check_tokenizer(load_tokenizer(tmp_path / "tok"), world)
    other = make_world("ci-fast", 1)
    with pytest.raises(ValueError, match="train_tokenizer"):
        load_tokenizer(tmp_path / "tok", expect_world=other)


def test_the_hard_world_has_indirect_sources_distractors_and_filler():
    """lds-hard (docs/design.md §A world where the cause is not lexically visible)."""
    from msif_lite.world.generate import make_world, states_fact

    w = make_world("lds-hard", 0)
    docs = {d.doc_id: d for d in w.documents}
    names = {e.entity_id: e.name for e in w.entities}
    kinds = {k: sum(d.kind == k for d in w.documents) for k in ("bio", "link", "distractor")}
    assert kinds == {"bio": 156, "link": 52, "distractor": 104}
    n_alias = 0
    for f in w.facts:
        name, srcs = names[f.entity_id], [docs[d] for d in f.source_doc_ids]
        assert len(srcs) == 3
        direct = [d for d in srcs if states_fact(d.text, name, f.relation, f.value)]
        alias = [d for d in srcs if name not in d.text]
        assert len(direct) == 2 and len(alias) == 1, (f, [d.text for d in srcs])
        n_alias += 1
    assert n_alias == len(w.facts)
    for d in w.documents:
        if d.kind == "distractor":  # the name and a true answer, but no fact stated
            e = next(e for e in w.entities if e.name in d.text)
            mine = [f for f in w.facts if f.entity_id == e.entity_id]
            assert any(f.value in d.text for f in mine)
            assert not any(states_fact(d.text, e.name, f.relation, f.value) for f in mine)
        if d.kind in ("bio", "link", "distractor"):
            assert len(d.text.split()) >= 20  # filler makes realistic lengths

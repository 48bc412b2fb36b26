"""load_model_pair through save_pretrained directories (no hub), pair checks, text readers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from msif_lite.attribution.checks import ALIBI_DEFAULT_CONTEXT, context_length
from msif_lite.scale.pairs import (
    budget,
    chunk_documents,
    load_model_pair,
    read_documents,
    read_pairs,
    read_texts,
    recorded_alpha,
    world_texts,
)
from msif_lite.world.generate import make_world
from msif_lite.world.lm import train_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(make_world("ci-fast", seed=0))


def _bloom(vocab: int, hidden: int = 32, seed: int = 0) -> BloomForCausalLM:
    torch.manual_seed(seed)
    return BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=2, n_head=2))


def _save(model, tok, path):
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


def test_pair_loads_through_from_pretrained(tmp_path, tok):
    pt = _save(_bloom(len(tok)), tok, tmp_path / "pt")
    ft_model = _bloom(len(tok))
    with torch.no_grad():
        ft_model.transformer.h[0].mlp.dense_h_to_4h.weight.add_(0.1)
    ft = _save(ft_model, tok, tmp_path / "ft")
    pair = load_model_pair(pt, ft)
    assert pair.pretrained.config.model_type == "bloom" and not pair.pretrained.training
    w = "transformer.h.0.mlp.dense_h_to_4h.weight"
    diff = dict(pair.finetuned.named_parameters())[w] - dict(pair.pretrained.named_parameters())[w]
    assert torch.allclose(diff, torch.full_like(diff, 0.1), atol=1e-6)
    assert len(pair.tokenizer) == len(tok)
    assert "pt → fine-tuned: " in pair.describe() and str(tmp_path) not in pair.describe()


def test_finetune_without_tokenizer_uses_base(tmp_path, tok):
    pt = _save(_bloom(len(tok)), tok, tmp_path / "pt")
    ft = _save(_bloom(len(tok), seed=1), None, tmp_path / "ft")
    assert load_model_pair(pt, ft).tokenizer is not None


def test_mismatched_architecture(tmp_path, tok):
    pt = _save(_bloom(len(tok)), tok, tmp_path / "pt")
    wider = _save(_bloom(len(tok), hidden=64), tok, tmp_path / "wide")
    with pytest.raises(ValueError, match="do not share an architecture"):
        load_model_pair(pt, wider)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32,
                                            num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64))  # fmt: skip
    other = _save(neox, tok, tmp_path / "neox")
    with pytest.raises(ValueError, match="different architectures.*bloom.*gpt_neox"):
        load_model_pair(pt, other)


def test_mismatched_tokenizer(tmp_path, tok):
    other_tok = train_tokenizer(make_world("ci-fast", seed=3))
    pt = _save(_bloom(len(tok)), tok, tmp_path / "pt")
    ft = _save(_bloom(len(tok)), other_tok, tmp_path / "ft")
    with pytest.raises(ValueError, match="tokenizers"):
        load_model_pair(pt, ft)
    small = _save(_bloom(100), tok, tmp_path / "small")
    with pytest.raises(ValueError, match="does not match the model"):
        load_model_pair(small, small)


def test_offline_hub_id_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE.*local directory"):
        load_model_pair("bigscience/bloom-560m-not-cached", "bigscience/bloomz-560m-not-cached")


def test_read_plain_text_paragraphs_and_lines(tmp_path, tok):
    f = tmp_path / "corpus.txt"
    f.write_text("First doc line one\nline two.\n\nSecond doc.\n\n\nThird doc here.\n")
    assert read_texts(f) == ["First doc line one line two.", "Second doc.", "Third doc here."]
    assert read_texts(f, split="line")[:2] == ["First doc line one", "line two."]
    assert read_texts(f, max_tokens=6) == ["First doc line one line two."]
    assert read_texts(f, max_tokens=7) == ["First doc line one line two.", "Second doc."]
    n = len(tok("Second doc.", add_special_tokens=False)["input_ids"]) + 1
    assert len(read_texts(f, max_tokens=n, tokenizer=tok)) == 1


def test_read_jsonl(tmp_path):
    f = tmp_path / "ft.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"text": "a b", "id": 1}, "plain string",
                                                     {"text": "c"}]) + "\n\n")  # fmt: skip
    assert read_texts(f) == ["a b", "plain string", "c"]
    g = tmp_path / "bad.jsonl"
    g.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="no string field 'text'"):
        read_texts(g)
    assert read_texts(g, field="content") == ["x"]
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1 is not a JSON line"):
        read_texts(tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError):
        read_texts(tmp_path / "missing.txt")


def test_budget_and_world_defaults():
    assert budget(["a b", "c d", "e"], 3) == ["a b", "c d"]
    assert budget(["a"], None) == ["a"]
    world, docs, pairs = world_texts()
    assert docs and pairs and all(isinstance(t, str) for _, t in docs)


def test_read_documents_keeps_ids(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"id": "a-1", "text": "first"}, {"id": 7,
                 "text": "second"}, {"text": "no id"}, "bare"]) + "\n")  # fmt: skip
    assert read_documents(f) == [("a-1", "first"), ("7", "second"), ("corpus:3", "no id"),
                                 ("corpus:4", "bare")]  # fmt: skip
    assert read_documents(f, max_tokens=1) == [("a-1", "first")]
    g = tmp_path / "notes.txt"
    g.write_text("One para\nhere.\n\nTwo.\n")
    assert read_documents(g) == [("notes:1", "One para here."), ("notes:2", "Two.")]
    d = tmp_path / "dup.jsonl"
    d.write_text(json.dumps({"id": "x", "text": "a"}) + "\n" + json.dumps({"id": "x", "text": "b"}))
    with pytest.raises(ValueError, match="'x' occurs twice .*documents 1 and 2"):
        read_documents(d)


def test_read_pairs(tmp_path):
    f = tmp_path / "ft.jsonl"
    f.write_text(json.dumps({"prompt": "Where?", "answer": "Here"}) + "\n\n")
    assert read_pairs(f) == [("Where?", "Here")]
    f.write_text(json.dumps({"question": "Where?", "answer": "Here"}) + "\n")
    with pytest.raises(ValueError, match="ft.jsonl:1 needs string fields 'prompt' and 'answer'"):
        read_pairs(f)
    assert read_pairs(f, prompt_field="question") == [("Where?", "Here")]
    (tmp_path / "ft.txt").write_text("Where? Here\n")
    with pytest.raises(ValueError, match="must be JSON lines"):
        read_pairs(tmp_path / "ft.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no fine-tuning pairs"):
        read_pairs(tmp_path / "empty.jsonl")


def test_chunk_documents_policy(tok):
    words = " ".join(f"word{i} Istrelle" for i in range(60))
    n_tokens = len(tok(words, add_special_tokens=False)["input_ids"])
    docs = [("short", "A short one."), ("long", words)]
    out, report = chunk_documents(docs, tok, 32)
    assert out[0] == ("short", "A short one.")
    ids = [d for d, _ in out[1:]]
    assert ids == [f"long#{n}" for n in range(1, len(ids) + 1)]
    assert len(ids) >= -(-n_tokens // 31)  # at least ⌈tokens / (context − 1)⌉ chunks
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 31 for _, t in out[1:])
    assert "".join(t for _, t in out[1:]).replace(" ", "") == words.replace(" ", "")
    assert str(report) == (f"1 of 2 documents longer than 32 tokens were split into {len(ids)} "
                           f"chunks (long → long#1 … long#{len(ids)})")  # fmt: skip
    same, report = chunk_documents(docs, tok, 10_000)
    assert same == docs and "all 2 documents fit" in str(report)
    with pytest.raises(ValueError, match="'long#1' is already a document's"):
        chunk_documents(docs + [("long#1", "x")], tok, 32)
    with pytest.raises(ValueError, match="integer >= 2"):
        chunk_documents(docs, tok, 1)
    slow = type("Slow", (), {"is_fast": False, "__call__": tok.__call__})()
    with pytest.raises(ValueError, match="needs a fast tokenizer"):
        chunk_documents(docs, slow, 32)


def test_context_length_sources(tok):
    from transformers import GPT2Config, LlamaConfig

    assert context_length(LlamaConfig(max_position_embeddings=96)) == (
        96, "config.max_position_embeddings")
    assert context_length(GPT2Config(n_positions=48))[0] == 48
    bloom = BloomConfig()
    assert context_length(bloom, tok)[0] == ALIBI_DEFAULT_CONTEXT  # tokenizer names no limit
    tok.model_max_length, old = 77, tok.model_max_length
    try:
        assert context_length(bloom, tok) == (
            77, "tokenizer.model_max_length (the model has no position limit)")
    finally:
        tok.model_max_length = old
    assert context_length(bloom, tok, override=500) == (500, "context_length setting")
    with pytest.raises(ValueError, match="integer >= 2"):
        context_length(bloom, tok, override=0)


def test_recorded_alpha(tmp_path):
    assert recorded_alpha(tmp_path) is None
    assert recorded_alpha("bigscience/bloomz-560m") is None  # a hub id records nothing
    (tmp_path / "msif_standin.json").write_text(json.dumps({"alpha": 0.02}))
    assert recorded_alpha(tmp_path) == 0.02
    (tmp_path / "msif_meta.json").write_text(json.dumps({"alpha": 0.5, "stage": "finetuned"}))
    assert recorded_alpha(tmp_path) == 0.5

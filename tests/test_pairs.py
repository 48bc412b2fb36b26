"""load_model_pair through save_pretrained directories (no hub), pair checks, text readers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from msif_lite.scale.pairs import budget, load_model_pair, read_texts, world_texts
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

"""The main job end to end on a tiny world saved like the shipped one: `msif-lite trace`,
the Attributor's methods, and the clear errors of standard 4."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.checks import check_same_architecture
from msif_lite.attribution.methods import METHODS
from msif_lite.attribution.trace import trace
from msif_lite.cli import main
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.prompts import as_prompt
from msif_lite.world.generate import make_world
from msif_lite.world.lm import build_model
from msif_lite.world.lm import train_tokenizer as make_tokenizer
from msif_lite.world.training import Checkpoint


@pytest.fixture(scope="module")
def tiny_shipped(tmp_path_factory):
    """ci-fast world + tokenizer + an untrained model and a perturbed 'fine-tune' (weights do
    not matter for plumbing), saved through save_pretrained like the shipped data."""
    return build_tiny_shipped(tmp_path_factory.mktemp("shipped"))


def _shipped(root):
    return load_tiny(root)


def _cfg(tmp_path, **kw) -> AttributionConfig:
    return AttributionConfig(cache_dir=str(tmp_path / "cache"), progress=False,
                             factors=FactorConfig(max_batches=2), **kw)  # fmt: skip


def test_trace_cli_json_lists_hits_with_true_sources(tiny_shipped, tmp_path, capsys):
    s = _shipped(tiny_shipped)
    q = s.world.queries[0]
    code = main(["trace", q.prompt, "--answer", q.answer, "--json", "-k", "5",
                 "--candidates", "20", "--world", str(tiny_shipped / "world"),
                 "--checkpoints", str(tiny_shipped / "ckpt"),
                 "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    assert code == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 5
    assert {"doc_id", "score", "text", "is_true_source"} <= set(hits[0])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(isinstance(h["is_true_source"], bool) for h in hits)  # a known world query
    truth = set(q.source_doc_ids)
    assert all(h["is_true_source"] == (h["doc_id"] in truth) for h in hits)


def test_trace_text_output_and_cache_reuse(tiny_shipped, tmp_path):
    s = _shipped(tiny_shipped)
    q = s.world.queries[1]
    cfg = _cfg(tmp_path)
    first = trace(s, q.prompt, answer=q.answer, k=3, n_candidates=15, config=cfg)
    files = sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors"))
    again = trace(s, q.prompt, answer=q.answer, k=3, n_candidates=15, config=cfg)
    assert [h.score for h in first.hits] == [h.score for h in again.hits]
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*.safetensors")) == files
    assert "true source" in first.as_text()


def test_unknown_model_path_is_a_clear_error(tmp_path, capsys):
    code = main(["trace", "Where was X born?", "--checkpoints", str(tmp_path / "nope"),
                 "--world", str(tmp_path / "nowhere")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "no world at" in err and "--world" in err


def test_empty_question_and_empty_candidates_are_refused(tiny_shipped, tmp_path):
    s = _shipped(tiny_shipped)
    with pytest.raises(ValueError, match="question is empty"):
        as_prompt("   ")
    att = Attributor(s.pretrained, s.finetuned, s.tokenizer,
                     [(d.doc_id, d.text) for d in s.world.documents],
                     [(p.prompt, p.answer) for p in s.world.finetune_qa], _cfg(tmp_path),
                     alpha=s.alpha)  # fmt: skip
    with pytest.raises(ValueError, match="candidate set is empty"):
        att.scores("grad_dot", s.world.queries[:1], [])
    with pytest.raises(ValueError, match="unknown method"):
        att.scores("no_such_method", s.world.queries[:1], ["d00000"])
    with pytest.raises(ValueError, match="no tokens"):
        att.qa_example("Question: Where?\nAnswer:", "   ")


def test_every_method_scores_the_same_candidates(tiny_shipped, tmp_path):
    s = _shipped(tiny_shipped)
    att = Attributor(s.pretrained, s.finetuned, s.tokenizer,
                     [(d.doc_id, d.text) for d in s.world.documents],
                     [(p.prompt, p.answer) for p in s.world.finetune_qa], _cfg(tmp_path),
                     alpha=s.alpha, mentions=s.world.document_mentions(),
                     checkpoints=[Checkpoint(0, 1e-3, s.pretrained.state_dict())])  # fmt: skip
    ids = [d.doc_id for d in s.world.documents[:12]]
    for m in METHODS:
        out = att.scores(m, s.world.queries[:2], ids)
        assert out.shape == (2, 12) and torch.isfinite(out).all(), m
    cos = att.scores("grad_cosine", s.world.queries[:2], ids)
    assert cos.abs().max() <= 1 + 1e-6


def test_mismatched_models_and_tokenizers_are_refused(tiny_shipped, tmp_path):
    s = _shipped(tiny_shipped)
    other = build_model("bloom-small", len(s.tokenizer), 0, s.tokenizer)
    with pytest.raises(ValueError, match="do not share an architecture"):
        check_same_architecture(s.pretrained, other)
    big = make_tokenizer(make_world("default", seed=1))
    small_vocab = build_model("ci-fast", 300, 0)
    with pytest.raises(ValueError, match="tokenizer does not match the model"):
        Attributor(small_vocab, copy.deepcopy(small_vocab), big, [("d", "text")],
                   [("q", "a")], _cfg(tmp_path), alpha=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="α is unknown"):
        Attributor(s.pretrained, s.finetuned, s.tokenizer, [("d", "text")], [("q", "a")],
                   _cfg(tmp_path))  # fmt: skip

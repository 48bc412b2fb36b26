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
from msif_lite.attribution.trace import as_questions, trace
from msif_lite.cli import main
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.prompts import DEFAULT_TEMPLATE, PromptTemplate, as_prompt, encode_pairs
from msif_lite.world.generate import make_world
from msif_lite.world.lm import build_model, greedy_answers
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
        missing = METHODS[m].requires() - att.provides
        if missing:  # the unrolled methods replay training: tests/test_unrolled_methods.py
            assert missing == {"training_run"}, (m, missing)
            continue
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


def test_prompt_template_parse_and_errors():
    t = PromptTemplate.parse("### Q: {question}\n### A:\n{answer}")
    assert t == PromptTemplate("### Q: ", "\n### A:", "\n")
    assert PromptTemplate.parse(t.describe()[1:-1].replace("\\n", "\n")) == t
    assert PromptTemplate.parse("Question: {question}\nAnswer: {answer}") == DEFAULT_TEMPLATE
    assert t.as_prompt("Where?") == "### Q: Where?\n### A:"
    assert t.as_prompt(t.as_prompt("Where?")) == t.as_prompt("Where?")  # idempotent
    assert t.strip(t.as_prompt("Where?")) == "Where?"
    assert PromptTemplate("", "", " ").as_prompt(" <s>[INST] hi [/INST]") == "<s>[INST] hi [/INST]"
    for bad in ("{answer} {question}", "no fields", "{question} {answer} tail"):
        with pytest.raises(ValueError, match="template"):
            PromptTemplate.parse(bad)
    with pytest.raises(TypeError, match="PromptTemplate"):
        AttributionConfig(template="Question: {question}")


def test_the_template_is_one_setting_for_h_ft_and_queries(tiny_shipped, tmp_path):
    """A custom template encodes the fine-tuning pairs (H_ft) and the queries alike, and is
    part of the factor cache key through the token ids."""
    s = _shipped(tiny_shipped)
    t = PromptTemplate("Q: ", " A:", " ")
    docs = [(d.doc_id, d.text) for d in s.world.documents[:20]]
    raw = [(p.prompt.removeprefix("Question: ").removesuffix("\nAnswer:"), p.answer)
           for p in s.world.finetune_qa]  # fmt: skip
    att = Attributor(s.pretrained, s.finetuned, s.tokenizer, docs, raw,
                     _cfg(tmp_path, template=t), alpha=s.alpha)  # fmt: skip
    for (p, a), ex in zip(raw, att.finetune_examples()):
        ids, labels = t.encode(s.tokenizer, f"Q: {p} A:", a)
        assert (list(ex.input_ids), list(ex.labels)) == (ids, labels)
    q = att.qa_example(raw[0][0], raw[0][1])
    assert list(q.input_ids) == list(att.finetune_examples()[0].input_ids)
    default = Attributor(s.pretrained, s.finetuned, s.tokenizer, docs, raw, _cfg(tmp_path),
                         alpha=s.alpha)  # fmt: skip
    # the kit's world prompts are already formatted: the default template leaves them as is
    shipped_pairs = [(p.prompt, p.answer) for p in s.world.finetune_qa]
    assert [c.input_ids for c in default.finetune_examples()] == [
        tuple(ids) for ids, _ in encode_pairs(s.tokenizer, shipped_pairs)]
    assert att.finetune_factors is not None and default.finetune_factors is not None
    assert len(list((tmp_path / "cache" / "factors").glob("finetuned-*"))) == 2


def test_top_k_rows_from_plain_prompts_and_pairs(tiny_shipped, tmp_path):
    s = _shipped(tiny_shipped)
    docs = [(d.doc_id, d.text) for d in s.world.documents[:15]]
    pairs = [(p.prompt, p.answer) for p in s.world.finetune_qa]
    att = Attributor(s.pretrained, s.finetuned, s.tokenizer, docs, pairs, _cfg(tmp_path),
                     alpha=s.alpha)  # fmt: skip
    q = s.world.queries[0]
    plain = q.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
    qs = as_questions(att, [plain, (q.prompt, q.answer)])
    assert qs[0].prompt == qs[1].prompt == q.prompt
    assert qs[0].answer == greedy_answers(s.finetuned, s.tokenizer, [q.prompt], 16)[0].strip()
    rows = att.top_k("grad_dot", [plain, (q.prompt, q.answer)], k=4)
    full = att.scores("grad_dot", qs, att.doc_ids)
    for r, row in zip(full, rows):
        assert [h.doc_id for h in row] == [att.doc_ids[i] for i in r.argsort(descending=True)[:4]]
        assert [h.rank for h in row] == [1, 2, 3, 4] and all(h.text for h in row)
    fixed = att.top_k("grad_dot", [(q.prompt, q.answer)], k=2, doc_ids=att.doc_ids[:3])[0]
    assert {h.doc_id for h in fixed} <= set(att.doc_ids[:3])
    with pytest.raises(ValueError, match="non-empty list"):
        att.top_k("grad_dot", plain)
    with pytest.raises(TypeError, match=r"\(prompt, answer\) pair"):
        att.top_k("grad_dot", [3])

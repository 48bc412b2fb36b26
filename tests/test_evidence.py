"""`attribution.evidence`: what a trace prints for each hit is the part of the document that
carries its score (issue 24), not the document's first characters."""

from __future__ import annotations

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.evidence import (
    ELLIPSIS,
    MARK,
    best_window,
    evidence,
    excerpt,
    overlap_evidence,
    sentence_spans,
    token_evidence,
    token_terms,
)
from msif_lite.attribution.trace import TracedQuestion, trace
from msif_lite.engine.factors import FactorConfig

FILLER = " ".join(f"Line {i} talks about the weather in general terms." for i in range(12))
LONG = FILLER + " Lind Xozae was born in Istrelle."


def _words(text: str) -> tuple[list[tuple[int, int]], list[str]]:
    """Whitespace 'tokens' of text with their character spans."""
    spans, words, i = [], [], 0
    for w in text.split(" "):
        spans.append((i, i + len(w)))
        words.append(w)
        i += len(w) + 1
    return spans, words


def test_top_token_at_the_end_of_a_long_document_is_shown():
    spans, words = _words(LONG)
    scores = [0.01] * len(words)
    scores[-1] = 5.0  # "Istrelle." carries the score
    ev = token_evidence(LONG, spans, scores, max_chars=90)
    assert ev.kind == "tokens"
    assert ev.text == f"{ELLIPSIS}Lind Xozae was born in {MARK[0]}Istrelle.{MARK[1]}"
    assert not ev.text.startswith("Line 0")  # the old output: the first 87 characters


def test_a_long_sentence_is_cut_to_its_best_window():
    text = "Intro. " + " ".join(f"w{i}" for i in range(60)) + " end."
    spans, words = _words(text)
    scores = [0.0] * len(words)
    scores[40] = 3.0  # w39
    ev = token_evidence(text, spans, scores, max_chars=30)
    body = ev.text.strip(ELLIPSIS)
    assert f"{MARK[0]}w39{MARK[1]}" in body
    assert len(body) - 2 <= 30 and ev.text.startswith(ELLIPSIS) and ev.text.endswith(ELLIPSIS)


def test_best_window_two_pointers_match_brute_force():
    """For every start the longest run that fits; the best of those (the earliest on ties)."""
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = int(torch.randint(1, 30, (1,), generator=g))
        widths = torch.randint(1, 12, (n,), generator=g).tolist()
        scores = torch.randn(n, generator=g).tolist()

        def longest(a, n=n, widths=widths):
            b = a + 1
            while b < n and sum(widths[a:b + 1]) <= 10:
                b += 1
            return b

        runs = [(a, longest(a)) for a in range(n)]
        want = max(runs, key=lambda r: (sum(scores[r[0]:r[1]]), -r[0]))
        assert best_window(widths, scores, 10) == want


def test_sentences_excerpt_and_overlap_without_token_scores():
    text = "Ada likes tea. Ada was born in Narvosk! Then she left.\n\nA new paragraph"
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "Ada likes tea.", "Ada was born in Narvosk!", "Then she left.", "A new paragraph"]
    assert excerpt(text, 0, 14) == "Ada likes tea." + ELLIPSIS
    ev = overlap_evidence(text, "Where was Ada born? Narvosk")
    assert ev.kind == "overlap" and ev.text == ELLIPSIS + "Ada was born in Narvosk!" + ELLIPSIS
    assert overlap_evidence(text, "zzz qqq").text.startswith("Ada likes tea.")  # first sentence


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = build_tiny_shipped(tmp_path_factory.mktemp("shipped"))
    return load_tiny(root), tmp_path_factory.mktemp("cache")


def _att(s, cache):
    cfg = AttributionConfig(cache_dir=str(cache), progress=False,
                            factors=FactorConfig(max_batches=2))  # fmt: skip
    return Attributor(s.pretrained, s.finetuned, s.tokenizer,
                      [(d.doc_id, d.text) for d in s.world.documents],
                      [(p.prompt, p.answer) for p in s.world.finetune_qa], cfg, alpha=s.alpha,
                      mentions=s.world.document_mentions())  # fmt: skip


@pytest.mark.parametrize("method", ["multi_stage", "grad_dot", "multi_stage_token_positive",
                                    "multi_stage_after_mention"])
def test_per_token_scores_sum_to_the_document_score(tiny, method):
    """The token scores the evidence is read from are the method's own terms: for the linear
    methods they sum to its score; the positive variant's sum is its score too."""
    s, cache = tiny
    att = _att(s, cache)
    q = TracedQuestion(s.world.queries[0].prompt, s.world.queries[0].answer)
    ids = [d.doc_id for d in s.world.documents[:5]]
    terms = token_terms(att, method, q, ids)
    scores = att.scores(method, [q], ids)[0]
    for d, sc in zip(ids, scores.tolist()):
        assert len(terms[d]) == len(att.candidate(d).input_ids)
        assert sum(terms[d]) == pytest.approx(sc, rel=1e-4, abs=1e-8)
    ev = evidence(att, method, q, ids)
    assert all(e.kind == "tokens" and e.text for e in ev.values())
    assert all(e.text.strip(ELLIPSIS).replace(MARK[0], "").replace(MARK[1], "")
               in att.texts[d] for d, e in ev.items())  # fmt: skip


def test_text_methods_fall_back_to_word_overlap(tiny):
    s, cache = tiny
    att = _att(s, cache)
    q0 = s.world.queries[0]
    ev = evidence(att, "bm25", TracedQuestion(q0.prompt, q0.answer), [s.world.documents[0].doc_id])
    assert next(iter(ev.values())).kind == "overlap"


def test_trace_prints_evidence_for_each_hit(tiny, tmp_path):
    s, cache = tiny
    q = s.world.queries[0]
    cfg = AttributionConfig(cache_dir=str(cache), progress=False,
                            factors=FactorConfig(max_batches=2))  # fmt: skip
    r = trace(s, q.prompt, answer=q.answer, k=3, n_candidates=12, config=cfg,
              compare="bm25", results_dir=str(tmp_path))  # fmt: skip
    text = r.as_text()
    assert "evidence: the sentence with the most per-token score, «» around its top" in text
    assert "compared: bm25 over the same 12 candidates" in text
    assert all(h.evidence for h in r.hits) and all(h.evidence for h in r.compared[1])
    js = r.as_json()
    assert js["compare"]["method"] == "bm25" and "evidence" in js["hits"][0]

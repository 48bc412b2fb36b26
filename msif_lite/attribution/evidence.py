"""The part of a document that carries its score: what `msif-lite trace` prints for each hit
instead of the document's first characters (issue 24).

A gradient method's score is a sum over the document's positions (Notebook 06 §Which tokens
carry the score?, `attribution.variants`):

    I(z, q) = Σ_t I_t,    I_t = Σ_l w_l Ds_{t,l}ᵀ P_l ā_{t,l}

and position t's term belongs to the token it predicts, x_{t+1}. The evidence of a document
is its sentence with the largest Σ of those token scores; a sentence longer than
`max_chars` is cut to at most `max_chars` characters around the top token of its
highest-scoring window, and the token with the largest score in the excerpt is marked
«so». The position-level variants (`multi_stage_token_*`) use their own per-position terms
(unit length, positive part), the after-mention variant its shortened loss. Methods
without per-token scores (BM25, embedding, random, the projected and unrolled methods)
show the sentence sharing the most words with the question and answer (BM25's words:
lowercased, stopwords removed), else the first sentence. `EVIDENCE_KINDS` says which, in
the trace's header.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from msif_lite.attribution.encoder import QuestionLike
from msif_lite.attribution.methods import GradientMethod, Method, get_method
from msif_lite.attribution.variants import (
    TokenMethod,
    TokenSum,
    decoded_token_spans,
    position_terms,
)
from msif_lite.engine.capture import capture_batch
from msif_lite.engine.prompts import retrieval_text

MAX_CHARS = 90
"""Longest excerpt printed per document (characters, without the marks)."""
MARK = ("«", "»")
ELLIPSIS = "…"
EVIDENCE_KINDS = {
    "tokens": "the sentence with the most per-token score, «» around its top token (a long "
              f"sentence cut to {MAX_CHARS} characters around it)",
    "overlap": "the sentence sharing the most words with the question and answer, else the "
               "first (this method has no per-token scores)",
}  # fmt: skip
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n\s*\n?")


@dataclass(frozen=True)
class Evidence:
    """An excerpt of a document and how it was chosen ("tokens" or "overlap")."""

    text: str
    kind: str


# ---------------------------------------------------------------------------- plain text
def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: split after . ! ? ; followed by white space and at
    line breaks; white space between sentences belongs to none."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans or [(0, len(text))]


def best_window(widths: Sequence[int], scores: Sequence[float], max_chars: int) -> tuple[int, int]:
    """[i, j): the run of consecutive tokens, at most `max_chars` characters wide in all,
    with the largest Σ score (for each start the longest run that fits; a token wider than
    `max_chars` alone). Ties: the earliest. O(n) with two pointers."""
    n = len(widths)
    if n == 0:
        return 0, 0
    pre = [0.0]
    for s in scores:
        pre.append(pre[-1] + float(s))
    best, j, w = (-math.inf, 0, 1), 0, 0
    for i in range(n):
        if j <= i:
            j, w = i, 0
        while j < n and w + widths[j] <= max_chars:
            w += widths[j]
            j += 1
        end = max(j, i + 1)
        if pre[end] - pre[i] > best[0]:
            best = (pre[end] - pre[i], i, end)
        if j > i:
            w -= widths[i]
    return best[1], best[2]


def centred(widths: Sequence[int], u: int, max_chars: int) -> tuple[int, int]:
    """[i, j) around token u, grown one token at a time on alternate sides while the run
    stays at most `max_chars` wide (so the token that carries a window sits in its middle)."""
    i, j, w = u, u + 1, widths[u]
    grew = True
    while grew:
        grew = False
        for side in (0, 1):
            if side == 0 and i > 0 and w + widths[i - 1] <= max_chars:
                i, w, grew = i - 1, w + widths[i - 1], True
            elif side == 1 and j < len(widths) and w + widths[j] <= max_chars:
                j, w, grew = j + 1, w + widths[j], True
    return i, j


def excerpt(text: str, start: int, end: int, mark: tuple[int, int] | None = None) -> str:
    """text[start:end] stripped, with … where the document goes on and «» around `mark`."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    body = text[start:end]
    if mark is not None:
        a, b = max(mark[0], start), min(mark[1], end)
        while a < b and text[a].isspace():
            a += 1
        if a < b:
            body = text[start:a] + MARK[0] + text[a:b] + MARK[1] + text[b:end]
    head = ELLIPSIS if text[:start].strip() else ""
    tail = ELLIPSIS if text[end:].strip() else ""
    return head + body + tail


def _clip(text: str, span: tuple[int, int], max_chars: int) -> tuple[int, int]:
    """A sentence longer than `max_chars` cut at word boundaries to its first max_chars."""
    s, e = span
    if e - s <= max_chars:
        return s, e
    cut = text.rfind(" ", s, s + max_chars)
    return s, cut if cut > s else s + max_chars


def overlap_evidence(text: str, query: str, max_chars: int = MAX_CHARS) -> Evidence:
    """The sentence sharing the most (BM25) words with `query`, else the first one; cut to
    `max_chars`."""
    from msif_lite.attribution.retrieval import BM25Index

    spans = sentence_spans(text)
    words = BM25Index._tokenize([query] + [text[s:e] for s, e in spans])
    q = set(words[0])
    counts = [len(q & set(w)) for w in words[1:]]
    best = max(range(len(spans)), key=lambda i: (counts[i], -i))
    return Evidence(excerpt(text, *_clip(text, spans[best], max_chars)), "overlap")


# ---------------------------------------------------------------------------- token scores
def token_evidence(text: str, spans: Sequence[tuple[int, int]], scores: Sequence[float],
                   max_chars: int = MAX_CHARS) -> Evidence:  # fmt: skip
    """The excerpt of `text` carrying the most of `scores` (one per token, `spans` the
    tokens' (start, end) characters in `text`): module docstring."""
    if len(spans) != len(scores):
        raise ValueError(f"{len(spans)} token spans but {len(scores)} token scores")
    sentences = sentence_spans(text)
    which = [next((k for k, (s, e) in enumerate(sentences) if a < e), len(sentences) - 1)
             for a, _ in spans]  # fmt: skip
    totals = [0.0] * len(sentences)
    for k, s in zip(which, scores):
        totals[k] += float(s)
    best = max(range(len(sentences)), key=lambda k: (totals[k], -k))
    start, end = sentences[best]
    members = [u for u, k in enumerate(which) if k == best]
    if end - start > max_chars and members:
        # each token as wide as the text up to the next token's start (the gaps included)
        starts = [max(spans[u][0], start) for u in members] + [end]
        widths = [b - a for a, b in zip(starts, starts[1:])]
        i, j = best_window(widths, [scores[u] for u in members], max_chars)
        top = max(range(i, j), key=lambda v: scores[members[v]])
        i, j = centred(widths, top, max_chars)
        members = members[i:j]
        start, end = starts[i], starts[j]
    top = max(members, key=lambda u: scores[u], default=None)
    mark = spans[top] if top is not None and scores[top] > 0 else None
    return Evidence(excerpt(text, start, end, mark), "tokens")


def token_spans(tokenizer, text: str,
                input_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """(text, each token's (start, end) in it) for a document encoded as text + eos: the
    tokenizer's offsets into `text` when it has them, else the decoded tokens' spans in the
    decoded text (which is then returned instead of `text`)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        if list(enc["input_ids"]) == list(input_ids[: len(offsets)]):
            return text, offsets + [(len(text), len(text))] * (len(input_ids) - len(offsets))
    except (NotImplementedError, KeyError, TypeError, ValueError):
        pass
    return decoded_token_spans(tokenizer, input_ids)


def token_terms(att, method: str | Method, question: QuestionLike,
                   doc_ids: Sequence[str]) -> dict[str, list[float]] | None:  # fmt: skip
    """doc_id → the score of each of its tokens (the term of the position predicting it;
    0 for the first token), or None when the method has no per-token split. The layer
    weights and the variants' unit/positive sums are applied; a per-document positive
    normalisation (cosine, RelatIF) is not: it does not move the evidence."""
    m = get_method(method) if isinstance(method, str) else method
    tokens, base = TokenSum.ALL, m
    if isinstance(m, TokenMethod):
        tokens, base = m.tokens, get_method(m.base)
    if not isinstance(base, GradientMethod) or not type(base).dense_dot:
        return None
    pre = base.preconditioned(att, [question], att.settings)
    weights = base.layer_mask(att).tolist()
    stage = att.stage(base.candidates_at)
    dtype = pre[stage.modules[0].name].dtype
    out, b = {}, att.encoder.batch_size
    for i in range(0, len(doc_ids), b):
        ids = list(doc_ids[i : i + b])
        cands = m.candidates(att, ids) if isinstance(m, TokenMethod) else att.candidates(ids)
        cap = capture_batch(stage.model, stage.task, att.collate(cands), stage.modules, dtype=dtype)
        terms = sum(w * x.token_scores(pre[mod.name])
                    for mod, x, w in zip(stage.modules, cap.layers, weights) if w).double()
        terms = position_terms(tokens, cap, terms, weights)[0]
        for row, c in enumerate(cands):
            t = terms[row, : len(c.input_ids)]
            # position t's term → the token it predicts, x_{t+1}
            out[ids[row]] = torch.cat([t.new_zeros(1), t[:-1]]).tolist()
    return out


def evidence(att, method: str | Method, question: QuestionLike, doc_ids: Sequence[str],
             max_chars: int = MAX_CHARS) -> dict[str, Evidence]:  # fmt: skip
    """doc_id → the `Evidence` of each document for `method` (module docstring)."""
    terms = token_terms(att, method, question, doc_ids)
    if terms is None:
        query = retrieval_text(question.prompt, question.answer)
        return {d: overlap_evidence(att.texts[d], query, max_chars) for d in doc_ids}
    out = {}
    for d in doc_ids:
        text, spans = token_spans(att.tokenizer, att.texts[d], att.candidate(d).input_ids)
        out[d] = token_evidence(text, spans, terms[d], max_chars)
    return out

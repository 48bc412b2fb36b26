"""Trace a question to the pre-training documents behind the fine-tuned model's answer:
the kit's main job (`msif-lite trace "<question>"`, Notebook 07 §Fact tracing).

1. the fine-tuned model answers the question (greedy), unless an answer is given;
2. candidate selection: the `n_candidates` documents nearest to "question + answer" under
   all-MiniLM-L6-v2 (the paper's semantic pre-selection); a corpus of at most
   `n_candidates` documents is scored whole;
3. the candidates are ranked by multi-stage influence (or another method) of the answer,
   m = −log p(answer | prompt) at θ_ft, prompt = `AttributionConfig.template.as_prompt`.

`trace` runs it on the kit's world (`Shipped`), `trace_attributor` on any `Attributor`
(a user's own model pair and corpus: `msif-lite trace --pretrained … --finetuned …`), and
`top_k` ranks documents for many questions at once, as rows (doc_id, score, text).

What a trace prints (issue 24): which template encoded the question (`attribution.chat`);
for each hit the part of the document that carries its score (`attribution.evidence`), not
its first characters; optionally a second method's ranking of the same candidates
(`compare=`); and on the kit's world what the kit measured about the method against
retraining (`attribution.measured`), since a ranking alone cannot say that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.chat import query_text, template_note
from msif_lite.attribution.checks import check_question_fits
from msif_lite.attribution.evidence import EVIDENCE_KINDS, evidence
from msif_lite.attribution.measured import measured_lines
from msif_lite.attribution.methods import Method, get_method
from msif_lite.engine.inputs import check_top_k, shorten
from msif_lite.world.lm import greedy_answers
from msif_lite.world.shipped import Shipped

MAX_ANSWER_TOKENS = 16
"""Greedy decoding budget of the fine-tuned model's own answer (it stops at newline/eos)."""


@dataclass(frozen=True)
class TracedQuestion:
    """A formatted prompt (`PromptTemplate.as_prompt`) and the answer attributed."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class TraceHit:
    """One ranked document: rank (1 = most helpful), its id, score and text."""

    rank: int
    doc_id: str
    score: float
    text: str
    is_true_source: bool | None = None  # None when the question is not one the world knows
    evidence: str = ""  # the part of the text that carries the score (attribution.evidence)


def check_encodable(tokenizer, text: str, max_positions: int) -> list[int]:
    """Token ids of `text`, refusing text the tokenizer maps to unknown tokens or that is
    longer than the model's context."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        raise ValueError(
            f"the tokenizer cannot encode {shorten(text)} (unknown tokens): rephrase the question "
            "with characters the tokenizer knows, or use the tokenizer saved with the model."
        )
    check_question_fits(len(ids), max_positions, MAX_ANSWER_TOKENS, text)
    return ids


def model_answer(att: Attributor, prompt: str, max_new_tokens: int = MAX_ANSWER_TOKENS) -> str:
    """The fine-tuned model's greedy answer to a formatted prompt; refuses an empty one."""
    answer = greedy_answers(att.finetuned, att.tokenizer, [prompt], max_new_tokens)[0]
    if not answer.strip():
        raise ValueError(
            f"the fine-tuned model gave an empty answer to {prompt!r}, so there is nothing to "
            "attribute: pass the answer to attribute (--answer, or a (prompt, answer) pair)."
        )
    return answer.strip()


def as_questions(att: Attributor, questions: Sequence) -> list[TracedQuestion]:
    """Questions as (formatted prompt, answer). Each item is a plain question or prompt
    (str: the answer is the fine-tuned model's greedy answer), a (prompt, answer) pair, or
    an object with .prompt and .answer. Prompts go through `att.config.template`."""
    if isinstance(questions, str) or not questions:
        raise ValueError("questions must be a non-empty list (of prompts or (prompt, answer) "
                         "pairs), e.g. ['Where was Ada born?']")  # fmt: skip
    t, out = att.config.template, []
    for q in questions:
        if isinstance(q, str):
            prompt = t.as_prompt(q)
            check_encodable(att.tokenizer, prompt, att.context)
            out.append(TracedQuestion(prompt, model_answer(att, prompt)))
        elif isinstance(q, tuple | list) and len(q) == 2 and all(isinstance(x, str) for x in q):
            out.append(TracedQuestion(t.as_prompt(q[0]), q[1].strip()))
        elif hasattr(q, "prompt") and hasattr(q, "answer"):
            out.append(TracedQuestion(t.as_prompt(q.prompt), q.answer.strip()))
        else:
            raise TypeError(f"a question must be a str, a (prompt, answer) pair or have "
                            f".prompt/.answer; got {q!r}")  # fmt: skip
    return out


def for_scoring(att: Attributor, qs: Sequence[TracedQuestion]) -> list[TracedQuestion]:
    """The questions as the methods get them: the bare question (`template.strip`) and the
    answer. The encoder wraps it in the template again for the gradient methods
    (`Encoder.qa_example`), and the text methods match it without any wrapper, whichever
    template (the kit's, --template, a chat template) formatted it."""
    return [TracedQuestion(att.config.template.strip(q.prompt), q.answer) for q in qs]


def candidates_for(att: Attributor, q: TracedQuestion, n_candidates: int | None) -> list[str]:
    """The whole corpus when it has at most `n_candidates` documents (or None), else the
    `n_candidates` nearest to question + answer under the embedding index."""
    if n_candidates is not None and n_candidates < 1:
        raise ValueError("n_candidates must be >= 1 (or None: every document)")
    if n_candidates is None or n_candidates >= len(att.doc_ids):
        return list(att.doc_ids)
    text = query_text(q.prompt, q.answer, att.config.template)
    cand = [d for d, _ in att.embedding_index.search([text], n_candidates)[0]]
    if not cand:
        raise ValueError("the candidate set is empty: raise n_candidates.")
    return cand


def rank(att: Attributor, doc_ids: Sequence[str], scores, k: int,
         truth: set[str] | None = None) -> list[TraceHit]:  # fmt: skip
    """The k highest-scoring of `doc_ids` as rows."""
    order = scores.argsort(descending=True)[:k].tolist()
    return [TraceHit(r + 1, doc_ids[i], float(scores[i]), att.texts[doc_ids[i]],
                     None if truth is None else doc_ids[i] in truth)  # fmt: skip
            for r, i in enumerate(order)]


def top_k(att: Attributor, method: str | Method, questions: Sequence, k: int = 10,
          doc_ids: Sequence[str] | None = None, *, n_candidates: int | None = None
          ) -> list[list[TraceHit]]:  # fmt: skip
    """Per question, the k most helpful documents as rows (rank, doc_id, score, text).

    questions: see `as_questions` (plain prompts are answered by the fine-tuned model).
    doc_ids: the candidates for every question; None: the whole corpus, or with
    `n_candidates` the nearest documents per question (`candidates_for`)."""
    m = get_method(method) if isinstance(method, str) else method
    k = check_top_k(k)
    qs = as_questions(att, questions)
    if doc_ids is not None or n_candidates is None or n_candidates >= len(att.doc_ids):
        ids = list(doc_ids if doc_ids is not None else att.doc_ids)
        scores = att.scores(m, for_scoring(att, qs), ids)
        return [rank(att, ids, s, k) for s in scores]
    out = []
    for q in qs:
        ids = candidates_for(att, q, n_candidates)
        out.append(rank(att, ids, att.scores(m, for_scoring(att, [q]), ids)[0], k))
    return out


def true_sources(shipped: Shipped, prompt: str) -> set[str] | None:
    """Ground-truth source documents when the prompt is one of the world's questions."""
    world = shipped.world
    for item in list(world.queries) + list(world.finetune_qa):
        if item.prompt.strip() == prompt.strip():
            return set(world.fact(item.fact_id).source_doc_ids)
    return None


def ranked_with_evidence(att: Attributor, method: str, q: TracedQuestion, cand: list[str],
                         k: int, truth: set[str] | None) -> tuple[list[TraceHit], str]:  # fmt: skip
    """The k best of `cand` under `method`, each with its evidence, and how the evidence
    was chosen (a line of `EVIDENCE_KINDS`)."""
    asked = for_scoring(att, [q])[0]
    hits = rank(att, cand, att.scores(method, [asked], cand)[0], k, truth)
    ev = evidence(att, method, asked, [h.doc_id for h in hits])
    kind = next(iter(ev.values())).kind if ev else "tokens"
    return [replace(h, evidence=ev[h.doc_id].text) for h in hits], kind


def trace_attributor(
    att: Attributor,
    question: str,
    *,
    answer: str | None = None,
    k: int = 10,
    n_candidates: int | None = 100,
    method: str = "multi_stage",
    truth=None,
    notes: Sequence[str] = (),
    compare: str | None = None,
) -> TraceResult:
    """Rank candidate documents of `att` for one question (see the module docstring).
    `truth(prompt)` gives the true sources when known; `notes` are printed with the result
    (how the corpus was read, where α came from); `compare`: a second method whose ranking
    of the same candidates is printed beside the first."""
    get_method(method)  # a clear error for an unknown method, before any work
    if compare is not None:
        get_method(compare)
    k = check_top_k(k)
    if n_candidates is not None:
        n_candidates = check_top_k(n_candidates, "n_candidates")
    prompt = att.config.template.as_prompt(question)
    check_encodable(att.tokenizer, prompt, att.context)
    if answer is not None and not answer.strip():
        raise ValueError("the answer is empty: pass a real --answer, or none to attribute the "
                         "fine-tuned model's own answer")  # fmt: skip
    q = TracedQuestion(prompt, answer.strip() if answer is not None else model_answer(att, prompt))
    cand = candidates_for(att, q, n_candidates)
    known = None if truth is None else truth(prompt)
    hits, kind = ranked_with_evidence(att, method, q, cand, k, known)
    other = None
    if compare is not None and compare != method:
        other = (compare, *ranked_with_evidence(att, compare, q, cand, k, known))
    notes = [template_note(att.tokenizer, att.config.template), *notes]
    return TraceResult(q, method, hits, len(cand), att.describe(), answer is None,
                       notes, att.config.template.strip(prompt), kind, other)  # fmt: skip


def trace(
    shipped: Shipped,
    question: str,
    *,
    answer: str | None = None,
    k: int = 10,
    n_candidates: int = 100,
    method: str = "multi_stage",
    config: AttributionConfig | None = None,
    compare: str | None = None,
    results_dir: str | None = None,
) -> TraceResult:
    """`trace_attributor` on the kit's world and checkpoints, with its true sources and what
    the kit measured about `method` against retraining (`results_dir`, default the
    repository's results/; `attribution.measured`)."""
    get_method(method)
    docs = [(d.doc_id, d.text) for d in shipped.world.documents]
    pairs = [(p.prompt, p.answer) for p in shipped.world.finetune_qa]
    att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer, docs, pairs,
                     config or AttributionConfig(), alpha=shipped.alpha)  # fmt: skip
    result = trace_attributor(att, question, answer=answer, k=k, n_candidates=n_candidates,
                              method=method, truth=lambda p: true_sources(shipped, p),
                              compare=compare)  # fmt: skip
    result.measured = measured_lines(method, results_dir, traced_world=shipped.world.preset,
                                     question=None if compare else question)  # fmt: skip
    return result


def _table(hits: Sequence[TraceHit]) -> list[str]:
    """The ranking as aligned rows: rank, score, true source (when known), doc_id, evidence."""
    known = any(h.is_true_source is not None for h in hits)
    w = max([6] + [len(h.doc_id) for h in hits])
    lines = [f"{'rank':>4}  {'score':>11}  " + ("true source  " if known else "")
             + f"{'doc_id':{w}}  evidence"]  # fmt: skip
    for h in hits:
        mark = {True: "yes", False: "no", None: "unknown"}[h.is_true_source]
        text = h.evidence or (h.text if len(h.text) <= 90 else h.text[:87] + "...")
        col = f"{mark:11}  " if known else ""
        lines.append(f"{h.rank:>4}  {h.score:>11.4g}  {col}{h.doc_id:{w}}  {text}")
    return lines


@dataclass
class TraceResult:
    question: TracedQuestion
    method: str
    hits: list[TraceHit]
    n_candidates: int
    settings: dict
    answer_from_model: bool = True
    notes: list[str] = field(default_factory=list)
    bare_question: str = ""
    evidence_kind: str = "tokens"
    compared: tuple[str, list[TraceHit], str] | None = None  # (method, hits, evidence kind)
    measured: list[str] = field(default_factory=list)  # what the kit measured (the kit's world)

    def as_json(self) -> list[dict] | dict:
        """The hits as a list of {rank, doc_id, score, text, is_true_source, evidence}; with a
        compared method, {"method": …, "hits": […], "compare": {"method": …, "hits": […]}}."""
        hits = [asdict(h) for h in self.hits]
        if self.compared is None:
            return hits
        name, other, _ = self.compared
        return {"method": self.method, "hits": hits,
                "compare": {"method": name, "hits": [asdict(h) for h in other]}}  # fmt: skip

    def as_text(self) -> str:
        q = self.question
        who = "fine-tuned model" if self.answer_from_model else "given"
        lines = [
            *self.notes,
            f"question: {self.bare_question or q.prompt}",
            f"answer ({who}): {q.answer}",
            f"method: {self.method} over {self.n_candidates} candidates "
            f"(curvature={self.settings['curvature']}, fisher={self.settings['fisher']}, "
            f"alpha={self.settings['alpha']:g}, "
            f"alpha included in scores: {self.settings['alpha_included_in_scores']})",
            f"evidence: {EVIDENCE_KINDS[self.evidence_kind]}",
            "",
            *_table(self.hits),
        ]
        if self.compared is not None:
            name, other, kind = self.compared
            lines += ["", f"compared: {name} over the same {self.n_candidates} candidates "
                      f"(evidence: {EVIDENCE_KINDS[kind]})", "", *_table(other)]  # fmt: skip
        if self.measured:
            lines += ["", *self.measured]
        return "\n".join(lines)

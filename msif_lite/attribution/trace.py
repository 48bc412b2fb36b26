"""Trace one question to the pre-training documents behind the fine-tuned model's answer:
the kit's main job (`msif-lite trace "<question>"`, Notebook 07 §Fact tracing).

1. the fine-tuned model answers the question (greedy), unless an answer is given;
2. candidate selection: the `n_candidates` documents nearest to "question + answer" under
   all-MiniLM-L6-v2 (the paper's semantic pre-selection);
3. the candidates are ranked by multi-stage influence (or another method) of the answer,
   m = −log p(answer | question) at θ_ft.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import get_method
from msif_lite.engine.prompts import as_prompt, retrieval_text, strip_scaffold
from msif_lite.world.lm import greedy_answers
from msif_lite.world.shipped import Shipped


@dataclass(frozen=True)
class TracedQuestion:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TraceHit:
    rank: int
    doc_id: str
    score: float
    text: str
    is_true_source: bool | None  # None when the question is not one the world knows


def check_encodable(tokenizer, text: str, max_positions: int) -> list[int]:
    """Token ids of `text`, refusing text the tokenizer maps to unknown tokens or that is
    longer than the model's context."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        raise ValueError(
            f"the tokenizer cannot encode {text!r} (unknown tokens): rephrase the question "
            "with characters the tokenizer knows, or use the tokenizer saved with the model."
        )
    if len(ids) + 16 > max_positions:
        raise ValueError(
            f"the question is {len(ids)} tokens; the model's context is {max_positions}: "
            "shorten the question."
        )
    return ids


def true_sources(shipped: Shipped, prompt: str) -> set[str] | None:
    """Ground-truth source documents when the prompt is one of the world's questions."""
    world = shipped.world
    for item in list(world.queries) + list(world.finetune_qa):
        if item.prompt.strip() == prompt.strip():
            return set(world.fact(item.fact_id).source_doc_ids)
    return None


def trace(
    shipped: Shipped,
    question: str,
    *,
    answer: str | None = None,
    k: int = 10,
    n_candidates: int = 100,
    method: str = "multi_stage",
    config: AttributionConfig | None = None,
) -> TraceResult:
    """Rank candidate pre-training documents for one question (see the module docstring)."""
    get_method(method)  # a clear error for an unknown method, before any work
    if k < 1 or n_candidates < 1:
        raise ValueError("k and n_candidates must be >= 1")
    prompt = as_prompt(question)
    check_encodable(shipped.tokenizer, prompt, shipped.finetuned.config.max_position_embeddings)
    if answer is None:
        answer = greedy_answers(shipped.finetuned, shipped.tokenizer, [prompt])[0]
    if not answer.strip():
        raise ValueError(
            "the fine-tuned model gave an empty answer, so there is nothing to attribute: "
            "pass --answer to attribute a specific answer."
        )
    q = TracedQuestion(prompt, answer.strip())
    docs = [(d.doc_id, d.text) for d in shipped.world.documents]
    pairs = [(p.prompt, p.answer) for p in shipped.world.finetune_qa]
    att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer, docs, pairs,
                     config or AttributionConfig(), alpha=shipped.alpha)  # fmt: skip
    text = retrieval_text(prompt, q.answer)
    cand = [d for d, _ in att.embedding_index.search([text], n_candidates)[0]]
    if not cand:
        raise ValueError("the candidate set is empty: raise n_candidates.")
    scores = att.scores(method, [q], cand)[0]
    truth = true_sources(shipped, prompt)
    order = scores.argsort(descending=True)[:k].tolist()
    hits = [
        TraceHit(r + 1, cand[i], float(scores[i]), att.texts[cand[i]],
                 None if truth is None else cand[i] in truth)  # fmt: skip
        for r, i in enumerate(order)
    ]
    return TraceResult(q, method, hits, len(cand), att.describe())


@dataclass(frozen=True)
class TraceResult:
    question: TracedQuestion
    method: str
    hits: list[TraceHit]
    n_candidates: int
    settings: dict

    def as_json(self) -> list[dict]:
        """The hits as a list of {rank, doc_id, score, text, is_true_source}."""
        return [asdict(h) for h in self.hits]

    def as_text(self) -> str:
        q = self.question
        lines = [
            f"question: {strip_scaffold(q.prompt)}",
            f"answer (fine-tuned model): {q.answer}",
            f"method: {self.method} over {self.n_candidates} candidates "
            f"(curvature={self.settings['curvature']}, fisher={self.settings['fisher']}, "
            f"alpha={self.settings['alpha']:g}, "
            f"alpha included in scores: {self.settings['alpha_included_in_scores']})",
            "",
            f"{'rank':>4}  {'score':>11}  {'true source':11}  doc_id  text",
        ]
        for h in self.hits:
            mark = {True: "yes", False: "no", None: "unknown"}[h.is_true_source]
            text = h.text if len(h.text) <= 90 else h.text[:87] + "..."
            lines.append(f"{h.rank:>4}  {h.score:>11.4g}  {mark:11}  {h.doc_id}  {text}")
        return "\n".join(lines)

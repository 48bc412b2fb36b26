"""The fact-tracing protocol of Exp 2 (arXiv 2505.05017): candidate pools, MRR and
Recall@10 per draw, and the diagnostics of why a method misses (notebook 07 §Fact tracing;
`msif-lite bench fact-tracing` writes the report).

- `draw_candidates`: BM25 top-k ∪ true sources ∪ random documents ∪ documents sharing the
  answer string, the paper's candidate pool for one query; `build_draws` makes seeded draws;
- `evaluate` / `summarize`: MRR and Recall@10 of one draw, mean ± std over draws;
- `analysis`: which documents outrank the true sources, AUCs, lexical overlap.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from msif_lite.engine.prompts import retrieval_text
from msif_lite.eval.metrics import mean_std, rank_candidates, recall_at_k, reciprocal_rank


def summarize(per_draw: Sequence[tuple[float, float]]) -> dict[str, float]:
    """{(mrr, recall@10) per draw} → mrr_mean/std, recall10_mean/std."""
    mrr_m, mrr_s = mean_std([m for m, _ in per_draw])
    rec_m, rec_s = mean_std([r for _, r in per_draw])
    return {"mrr_mean": mrr_m, "mrr_std": mrr_s, "recall10_mean": rec_m, "recall10_std": rec_s}


def contains_phrase(text: str, phrase: str) -> bool:
    """True when `phrase` occurs in `text` as whole words (case-insensitive)."""
    return re.search(r"(?<!\w)" + re.escape(phrase) + r"(?!\w)", text, re.IGNORECASE) is not None


def draw_candidates(
    true: Sequence[str],
    bm25_top: Sequence[str],
    all_ids: Sequence[str],
    answer_ids: Sequence[str],
    rng: np.random.Generator,
    n_random: int,
    n_answer: int,
) -> list[str]:
    """BM25 top-k ∪ true ∪ `n_random` random documents ∪ up to `n_answer` documents sharing
    the answer (sampled without replacement); sorted ids (rank order comes from scores)."""
    pool = set(true) | set(bm25_top)
    k = min(n_random, len(all_ids))
    pool |= {all_ids[i] for i in rng.choice(len(all_ids), k, replace=False)}
    share = sorted(set(answer_ids) - set(true))
    if share:
        k = min(n_answer, len(share))
        pool |= {share[i] for i in rng.choice(len(share), k, replace=False)}
    return sorted(pool)


def evaluate(
    scores: np.ndarray,
    col: dict[str, int],
    candidates: Sequence[Sequence[str]],
    truths: Sequence[set[str]],
    rows: Sequence[int],
    rng: np.random.Generator,
) -> tuple[float, float, list[float], list[str]]:
    """Mean MRR, mean Recall@10, per-query RR and top-ranked document of one draw: query j
    (row rows[j] of `scores`, columns indexed by `col`) ranks `candidates[j]` vs `truths[j]`."""
    rrs, recs, firsts = [], [], []
    for r, cand, truth in zip(rows, candidates, truths):
        ranked = rank_candidates(scores[r, [col[d] for d in cand]], cand, rng)
        rrs.append(reciprocal_rank(ranked, truth))
        recs.append(recall_at_k(ranked, truth, 10))
        firsts.append(ranked[0])
    return float(np.mean(rrs)), float(np.mean(recs)), rrs, firsts


MLP_SHARE_DEFINITION = (
    "abs_all: mean over queries of Σ_n |mlp_qn| / Σ_n (|mlp_qn| + |attn_qn|) over the query's "
    "candidates (mlp/attn = the parts of the multi-stage score from MLP/attention layers); "
    "abs_true: the same over each query's true sources only; signed_true: Σ mlp / Σ (mlp + "
    "attn) over all (query, true source) pairs, i.e. the MLP share of the total score the "
    "true sources receive (can leave [0, 1] when the two parts disagree in sign)."
)


def mlp_shares(mlp: np.ndarray, attn: np.ndarray, true_mask: np.ndarray) -> dict[str, float]:
    """How much of the multi-stage score the MLP layers carry (arrays (Q, N); the three
    measures are defined in MLP_SHARE_DEFINITION)."""
    a, b = np.abs(mlp), np.abs(attn)
    abs_all = (a.sum(1) / np.maximum((a + b).sum(1), 1e-300)).mean()
    ta, tb = (a * true_mask).sum(1), (b * true_mask).sum(1)
    keep = true_mask.any(1)
    abs_true = (ta[keep] / np.maximum(ta[keep] + tb[keep], 1e-300)).mean()
    signed = (mlp * true_mask).sum() / ((mlp + attn) * true_mask).sum()
    return {"abs_all": float(abs_all), "abs_true": float(abs_true), "signed_true": float(signed)}


def outranking_kind(doc: dict, query_fact: dict) -> str:
    """Why a non-source document may rank first: it is about the same entity, states the
    same answer for another entity, is a value blurb, or none of these ('other')."""
    if doc["kind"] == "blurb":
        return "value blurb"
    if query_fact["entity_id"] in doc["entity_ids"]:
        return "same entity, other fact"
    if query_fact["value"] in doc["values"]:
        return "other entity, same answer"
    return "other"


def pairwise_auc(scores: np.ndarray, pos: Sequence[int], neg: Sequence[int]) -> float:
    """P(score of a true source > score of a distractor) over all (pos, neg) pairs; ties
    count 1/2 (the AUC of one query against one distractor class)."""
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("pairwise_auc needs at least one positive and one negative")
    a, b = np.asarray(scores)[list(pos)][:, None], np.asarray(scores)[list(neg)][None, :]
    return float(((a > b) + 0.5 * (a == b)).mean())


# ---------------------------------------------------------------- analysis and report
def analysis(world, per_query: dict, top1: dict, correct: dict[int, bool],
             full: dict[str, np.ndarray] | None = None, rows: dict[int, int] | None = None,
             union: list[str] | None = None) -> dict:
    """Per-query diagnostics: MRR by whether the fine-tuned model answers the query and by
    relation, per-query multi-stage wins, what kind of document each method ranks first
    when it is not a true source, and the AUC of true sources against each kind of
    distractor over the whole scored corpus. `per_query[m][j]`: RRs of query j over draws;
    `top1[m]`: (query, first document) pairs; `full[m]`: (Q, N) scores of `union`, query j
    in row rows[j]. Without `full`/`rows`/`union` the corpus-wide AUCs are left out."""
    facts = {f.fact_id: f for f in world.facts}
    docs = {d.doc_id: {"kind": d.kind, "entity_ids": {facts[f].entity_id for f in d.fact_ids},
                       "values": {facts[f].value for f in d.fact_ids}}
            for d in world.documents}  # fmt: skip
    world_text = {d.doc_id: d.text for d in world.documents}
    ent = {e.entity_id: e.name for e in world.entities}
    names = {j: ent[facts[world.queries[j].fact_id].entity_id] for j in correct}
    qmrr = {m: {j: float(np.mean(v)) for j, v in pq.items()} for m, pq in per_query.items()}
    used = sorted(correct)

    def group_mean(m: str, keep) -> float | None:
        vals = [qmrr[m][j] for j in used if keep(j)]
        return float(np.mean(vals)) if vals else None

    rel = sorted({facts[world.queries[j].fact_id].relation for j in used})
    out: dict = {
        "finetuned_accuracy": float(np.mean([correct[j] for j in used])),
        "n_answered": int(sum(correct.values())), "n_scored": len(used),
        "mrr_by_answered": {m: {"answered": group_mean(m, lambda j: correct[j]),
                                "not_answered": group_mean(m, lambda j: not correct[j])}
                            for m in qmrr},
        "mrr_by_relation": {m: {r: group_mean(
            m, lambda j, r=r: facts[world.queries[j].fact_id].relation == r) for r in rel}
            for m in qmrr},
        "multi_stage_vs": {m: {"wins": float(np.mean([qmrr["multi_stage"][j] > qmrr[m][j]
                                                      for j in used])),
                               "losses": float(np.mean([qmrr["multi_stage"][j] < qmrr[m][j]
                                                        for j in used]))}
                           for m in qmrr if m != "multi_stage"},
        "top1": {},
        "auc_vs_distractors": {},
        "sources_contain_name_and_answer": float(np.mean([
            contains_phrase(world_text[d], names[j]) and contains_phrase(world_text[d], a)
            for j in used for a in [world.queries[j].answer]
            for d in world.queries[j].source_doc_ids])),
    }  # fmt: skip
    def kind(j: int, d: str) -> str:
        q, f = world.queries[j], facts[world.queries[j].fact_id]
        if d in q.source_doc_ids:
            return "true source"
        return outranking_kind(docs[d], {"entity_id": f.entity_id, "value": f.value})

    full, union = full or {}, union or []
    kinds_of: dict[int, dict[str, list[int]]] = {j: {"true source": []} for j in used}
    for j in used:
        for i, d in enumerate(union):
            kinds_of[j].setdefault(kind(j, d), []).append(i)
    out["true_source_score_positive"] = {m: float(np.mean(
        [sc[rows[j], i] > 0 for j in used for i in kinds_of[j]["true source"]]))
        for m, sc in full.items()}  # fmt: skip
    for m, sc in full.items():
        aucs: dict[str, list[float]] = {}
        for j in used:
            g = kinds_of[j]
            for k, idx in g.items():
                if k != "true source" and idx and g["true source"]:
                    aucs.setdefault(k, []).append(pairwise_auc(sc[rows[j]], g["true source"], idx))
        out["auc_vs_distractors"][m] = {k: float(np.mean(v)) for k, v in sorted(aucs.items())}
    for m, pairs in top1.items():
        out["top1"][m] = {}
        for j, d in pairs:
            k = kind(j, d)
            out["top1"][m][k] = out["top1"][m].get(k, 0.0) + 1 / len(pairs)
    return out


@dataclass(frozen=True)
class PoolConfig:
    """The paper's candidate pools (Exp 2) and how many seeded query draws to make."""

    n_queries: int = 200  # per draw (all queries if fewer exist)
    n_draws: int = 3
    bm25_k: int = 100
    n_random: int = 200
    n_answer: int = 100  # documents sharing the answer string
    embedding_k: int = 500  # candidates of the embedding-retrieval run (no oracle)
    seed: int = 0


def build_draws(att, world, cfg: PoolConfig) -> list[dict]:
    """Seeded query draws: for each, the queries and each query's paper-style candidate pool
    ("cands") and embedding-retrieved candidates ("emb"), both queried with question + answer."""
    queries, ids = world.queries, att.doc_ids
    n = min(cfg.n_queries, len(queries))
    texts = [retrieval_text(q.prompt, q.answer) for q in queries]
    share = {a: [d for d in ids if contains_phrase(att.texts[d], a)]
             for a in {q.answer for q in queries}}  # fmt: skip
    bm25 = [[d for d, _ in hits] for hits in att.bm25_index.search_many(texts, cfg.bm25_k)]
    emb = [[d for d, _ in h] for h in att.embedding_index.search(texts, cfg.embedding_k)]
    draws = []
    for i in range(cfg.n_draws):
        rng = np.random.default_rng([cfg.seed, i])
        qs = sorted(int(j) for j in rng.choice(len(queries), n, replace=False))
        cands = [draw_candidates(queries[j].source_doc_ids, bm25[j], ids,
                                 share[queries[j].answer], rng, cfg.n_random, cfg.n_answer)
                 for j in qs]  # fmt: skip
        draws.append({"queries": qs, "cands": cands, "emb": [emb[j] for j in qs]})
    return draws

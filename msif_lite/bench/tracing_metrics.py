"""Fact-tracing metrics and candidate sets (Exp 2 of arXiv 2505.05017; DESIGN.md §3).

- `rank_candidates`: order a query's candidates by score, best first; ties broken by a
  seeded random permutation (so a method that scores many documents equally, e.g. BM25
  with no word in common, gets no credit from the order candidates were listed in);
- `reciprocal_rank`: 1 / (1-based rank of the first true source), 0 if none is ranked;
- `recall_at_k`: |true ∩ top-k| / |true|;
- `mean_std`: mean and sample standard deviation (ddof=1) over draws;
- `draw_candidates`: BM25 top-k ∪ true sources ∪ random documents ∪ documents sharing the
  answer string, the paper's candidate pool for one query;
- `analysis`, `markdown`, `plots`: diagnostics and the results/fact_tracing.* report.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


def rank_candidates(scores: Sequence[float] | np.ndarray, candidates: Sequence[str],
                    rng: np.random.Generator | None = None) -> list[str]:  # fmt: skip
    """Candidates sorted by descending score; equal scores in a random (seeded) order."""
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (len(candidates),):
        raise ValueError(f"{s.shape[0] if s.ndim else 0} scores for {len(candidates)} candidates")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf: cannot rank the candidates")
    perm = (rng or np.random.default_rng(0)).permutation(len(s))
    order = perm[np.argsort(-s[perm], kind="stable")]
    return [candidates[i] for i in order]


def reciprocal_rank(ranked: Sequence[str], true: set[str] | Sequence[str]) -> float:
    """1 / rank of the first true source in `ranked` (rank 1 = first); 0.0 if absent."""
    truth = set(true)
    if not truth:
        raise ValueError("no true sources: the reciprocal rank is undefined")
    for i, d in enumerate(ranked):
        if d in truth:
            return 1.0 / (i + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], true: set[str] | Sequence[str], k: int = 10) -> float:
    """|true ∩ ranked[:k]| / |true| (true sources missing from `ranked` count as not found)."""
    truth = set(true)
    if not truth:
        raise ValueError("no true sources: recall is undefined")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return len(truth & set(ranked[:k])) / len(truth)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof=1; 0.0 for a single value)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


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


def _rows(d: dict, label: str) -> list[dict]:
    from msif_lite.bench.common import format_mean_std as pm

    return [{label: k, "MRR": pm(v, "mrr"), "Recall@10": pm(v, "recall10")}
            for k, v in d.items() if isinstance(v, dict)]  # fmt: skip


def markdown(p: dict) -> str:
    """The results as markdown tables (results/fact_tracing.md)."""
    from msif_lite.bench.common import markdown_table

    s, a = p["setup"], p["analysis"]
    cols = ["MRR", "Recall@10"]
    lay = p["layers"]
    text = [
        "# Fact tracing (Exp 2, arXiv 2505.05017)\n\n",
        f"Model `{s['model']}` ({s['checkpoints']}), world `{s['world_preset']}`: "
        f"{s['n_documents']} documents, {s['n_queries_per_draw']} queries per draw "
        f"({s['n_queries_available']} pre-training-only queries exist), {s['n_draws']} draws, "
        f"{s['mean_candidates_per_query']:.0f} candidates per query on average; mean ± "
        f"{s['mrr_std']}. α (trained) = {s['alpha_trained']:g}. Fast mode: {s['fast']}.\n",
        "\n## Methods\n\n", markdown_table(_rows(p["methods"], "method"), ["method", *cols]),
        "\nText baselines queried with question + answer (the gradient methods see the "
        "answer too):\n\n",
        markdown_table(_rows(p["methods_text_with_answer"], "method"), ["method", *cols]),
        "\n## Multi-stage: pre-training damping λ_pt (α = trained)\n\n",
        markdown_table(_rows(p["damping_sweep"], "λ_pt"), ["λ_pt", *cols]),
        "\n## Multi-stage: α (× trained α; λ_pt heuristic)\n\n",
        markdown_table(_rows(p["alpha_sweep"], "α factor"), ["α factor", *cols]),
        "\n## Layers\n\n", markdown_table(_rows({"all": lay["all"], "mlp": lay["mlp"]},
                                              "layers"), ["layers", *cols]),
        "\nMLP share of the multi-stage score: "
        + ", ".join(f"{k} = {v:.3f}" for k, v in lay["mlp_share"].items() if k != "definition")
        + f".\n\n{lay['mlp_share']['definition']}\n",
        f"\n## Embedding-retrieved candidates (top-{s['embedding_k']}, no oracle; true sources "
        f"retrieved: {p['embedding_candidates']['candidate_recall']:.3f})\n\n",
        markdown_table(_rows(p["embedding_candidates"], "method"), ["method", *cols]),
        f"\n## Analysis\n\nThe fine-tuned model answers {a['n_answered']} of the "
        f"{a['n_scored']} scored queries correctly (greedy, exact match). Share of true "
        f"sources that contain the entity's name and the answer verbatim: "
        f"{a['sources_contain_name_and_answer']:.3f}.\n\n",
        markdown_table([{"method": m, **{k: "-" if v is None else f"{v:.3f}"
                                          for k, v in g.items()}}
                        for m, g in a["mrr_by_answered"].items()],
                       ["method", "answered", "not_answered"]),
        "\nMRR by relation:\n\n",
        markdown_table([{"method": m, **{k: f"{v:.3f}" for k, v in g.items()}}
                        for m, g in a["mrr_by_relation"].items()],
                       ["method", *next(iter(a["mrr_by_relation"].values()))]),
        "\nWhat each method ranks first (fraction of query-draws):\n\n",
        markdown_table([{"method": m, **{k: f"{v:.3f}" for k, v in g.items()}}
                        for m, g in a["top1"].items()],
                       ["method", "true source", "same entity, other fact",
                        "other entity, same answer", "value blurb", "other"]),
        "\nAUC of true sources against each kind of distractor (all scored documents; 1 = "
        "every true source above every such distractor, 0.5 = chance):\n\n",
        markdown_table([{"method": m, **{k: f"{v:.3f}" for k, v in g.items()}}
                        for m, g in a["auc_vs_distractors"].items()],
                       ["method", "same entity, other fact", "other entity, same answer",
                        "value blurb", "other"]),
        "\nShare of (query, true source) pairs with a positive score (gradient methods: the "
        "formula says the source helps the answer): "
        + ", ".join(f"{m} {v:.3f}" for m, v in a["true_source_score_positive"].items()) + ".\n",
        "\nPer query, multi-stage vs each method (fraction of queries with higher / lower "
        "mean RR):\n\n",
        markdown_table([{"method": m, **v} for m, v in a["multi_stage_vs"].items()],
                       ["method", "wins", "losses"]),
        "\n## Checks\n\n", markdown_table([{"check": k, "value": v}
                                            for k, v in p["checks"].items()],
                                           ["check", "value"]),
        "\n## Setup\n\n", markdown_table([{"key": k, "value": v} for k, v in s.items()
                                            if k != "timings_s"], ["key", "value"]),
        "\n## Timings (s)\n\n", markdown_table([{"stage": k, "seconds": f"{v:.1f}"}
                                                  for k, v in s["timings_s"].items()],
                                                 ["stage", "seconds"]),
    ]  # fmt: skip
    return "".join(text)


def plots(p: dict, out_dir: str) -> list[str]:
    """results/fact_tracing_{methods,damping,alpha}.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    order = ("multi_stage", "single_stage", "finetune_only", "grad_dot", "grad_cosine",
             "embedding", "bm25", "embedding_qa", "bm25_qa")
    m = {k: {**p["methods"], **p["methods_text_with_answer"]}[k] for k in order}
    fig, ax = plt.subplots(figsize=(8, 3.8))
    colour = {"embedding": "tab:orange", "bm25": "tab:orange", "embedding_qa": "tab:gray",
              "bm25_qa": "tab:gray", "multi_stage": "tab:red"}  # others: gradient methods
    ax.bar(list(m), [v["mrr_mean"] for v in m.values()],
           yerr=[v["mrr_std"] for v in m.values()], capsize=4,
           color=[colour.get(k, "tab:blue") for k in m])  # fmt: skip
    ax.set(title="Fact tracing: MRR per method (mean ± std over draws)\nred: multi-stage, "
           "blue: gradient, orange: text, grey: text given the answer", ylabel="MRR",
           xlabel="method", ylim=(0, 1.05))  # fmt: skip
    ax.tick_params(axis="x", rotation=30)
    for name, sweep, xlabel, title, xkey in (
        ("methods", None, "", "", ""),
        ("damping", p["damping_sweep"], "pre-training damping λ_pt (absolute)",
         "Multi-stage MRR vs λ_pt (dashed: heuristic 0.1·mean Λ)", None),
        ("alpha", p["alpha_sweep"], "α used in the formula",
         "Multi-stage MRR vs α (dotted: trained α)", "alpha"),
    ):  # fmt: skip
        if sweep is not None:
            fig, ax = plt.subplots(figsize=(6, 3.8))
            pts = {(v[xkey] if xkey else float(k)): v for k, v in sweep.items()
                   if k != "heuristic"}  # fmt: skip
            xs = sorted(pts)
            ax.errorbar(xs, [pts[x]["mrr_mean"] for x in xs], [pts[x]["mrr_std"] for x in xs],
                        marker="o", capsize=4, label="multi-stage")  # fmt: skip
            if "heuristic" in sweep:
                ax.axhline(sweep["heuristic"]["mrr_mean"], ls="--", c="gray", label="heuristic")
            if xkey:
                ax.axvline(p["setup"]["alpha_trained"], ls=":", c="gray", label="trained α")
            ax.set(xscale="log", xlabel=xlabel, ylabel="MRR", title=title, ylim=(0, 1))
            ax.legend()
        fig.tight_layout()
        path = f"{out_dir}/fact_tracing_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

"""The payload, table and figure of `msif-lite bench real-lm` (msif_lite/bench/real_lm.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from msif_lite.bench.common import markdown_table
from msif_lite.eval.metrics import rank_candidates, recall_at_k, reciprocal_rank, sem

ROW_NOTES = {
    "true_sources": "every source of every question",
    "none": "full corpus, same seed (determinism: Δm should be 0)",
    "noise": "full corpus, another seed (seed noise)",
    "random": "k seeded random documents per question",
}


def fact_tracing(v: dict, truths: list[set[str]]) -> dict:
    """MRR, recall@10 and each question's best true-source rank over every document."""
    rng = np.random.default_rng(0)
    ranked = [rank_candidates(row, v["doc_ids"], rng) for row in v["scores"]]
    rr = [reciprocal_rank(r, t) for r, t in zip(ranked, truths)]
    return {"mrr": float(np.mean(rr)),
            "recall_at_10": float(np.mean([recall_at_k(r, t, 10) for r, t in zip(ranked, truths)])),
            "best_source_rank": [round(1 / x) if x else None for x in rr],
            "score_s": v["s"]}  # fmt: skip


def removal_row(spec: dict, row: dict, m0: np.ndarray, truths: list[set[str]]) -> dict:
    """Δm per question of one retrain, its mean ± s.e., accuracy after, what was removed."""
    dm = np.asarray(row["m"]) - m0
    counts = Counter(d for pq in spec["per_question"] for d in set(pq))
    sources = set().union(*truths)
    own = [len(set(pq) & t) for pq, t in zip(spec["per_question"], truths)]
    return {"own_sources_in_top_k": sum(own) if own else None, "dm": dm.tolist(),
            "dm_mean": float(dm.mean()), "dm_sem": sem(dm.tolist()),
            "accuracy_after": float(np.mean(row["correct"])), "n_removed": len(spec["removed"]),
            "n_shared": sum(c > 1 for c in counts.values()),
            "true_sources_removed": sum(d in sources for d in spec["removed"]),
            "seed": spec["seed"], "retrain_s": row["s"], "removed": spec["removed"],
            "per_question": spec["per_question"],
            "reused_from": row.get("reused_from")}  # fmt: skip


def summary(info: dict, world, scored: dict, specs: dict, rows: dict, wall_s: float) -> dict:
    """The JSON payload from what has been measured so far (status 'partial')."""
    truths = [set(q.source_doc_ids) for q in world.heldout]
    m0 = np.asarray(info["original"]["m"])
    removal = {n: removal_row(specs[n], r, m0, truths) for n, r in rows.items()}
    ref = removal.get("true_sources", {}).get("dm_mean")
    for r in removal.values():
        r["dm_relative_to_true_sources"] = r["dm_mean"] / ref if ref else None
    methods = {n: fact_tracing(v, truths) for n, v in scored.items()}
    compute = (info["original"]["pipeline"]["elapsed_s"] or 0.0) + info["fit"]["fit_s"] + sum(
        v["score_s"] for v in methods.values()) + sum(
        r["retrain_s"] for r in removal.values() if not r["reused_from"])
    return {"status": "partial", **info,
            "questions": [{"fact_id": q.fact_id, "prompt": q.prompt, "answer": q.answer,
                           "sources": list(q.source_doc_ids)} for q in world.heldout],
            "methods": methods, "removal": removal, "row_order": list(rows),
            "timings_s": {"wall_this_invocation": wall_s, "compute_incl_cached": compute,
                          "wall_all_invocations": info["wall_before_s"] + wall_s}}


def _cell(r: dict, key: str, fmt: str = ".2f") -> str:
    return "" if r.get(key) is None else format(r[key], fmt)


def table_rows(p: dict) -> list[dict]:
    out, first = [], [n for n in p["row_order"] if n not in ("none", "noise")]
    n_src = sum(len(q["sources"]) for q in p["questions"])
    for n in first + [n for n in ("none", "noise") if n in p["removal"]]:
        r, m = p["removal"][n], p["methods"].get(n, {})
        out.append({"row": n, "Δm (nats)": f"{r['dm_mean']:+.3f} ± {r['dm_sem']:.3f}",
                    "Δm / true sources": _cell(r, "dm_relative_to_true_sources"),
                    "accuracy after": f"{r['accuracy_after']:.2f}",
                    "removed (shared)": f"{r['n_removed']} ({r['n_shared']})",
                    "sources removed": r["true_sources_removed"],
                    "own sources in top-k": "" if r["own_sources_in_top_k"] is None else
                    f"{r['own_sources_in_top_k']}/{n_src}",
                    "MRR": _cell(m, "mrr", ".3f"), "recall@10": _cell(m, "recall_at_10", ".3f"),
                    "score s": _cell(m, "score_s", ".0f"), "retrain s": f"{r['retrain_s']:.0f}",
                    "note": ROW_NOTES.get(n) or (f"the same documents as {r['reused_from']}: "
                                                 "its retrain" if r["reused_from"] else "")})
    return out


def question_rows(p: dict) -> tuple[list[dict], list[str]]:
    """One row per question: m at θ_ft, greedy correctness, Δm of every removal row."""
    names = [n for n in p["row_order"] if n != "none"]
    rows = [{"question": f"{q['fact_id']}: {q['answer']}", "m": f"{m:.2f}",
             "greedy": "yes" if ok else "no",
             **{n: f"{p['removal'][n]['dm'][i]:+.2f}" for n in names}}
            for i, (q, m, ok) in enumerate(zip(p["questions"], p["original"]["m"],
                                               p["original"]["correct"]))]  # fmt: skip
    return rows, ["question", "m", "greedy", *names]


def markdown(p: dict) -> str:
    """results/real_lm.md: setup, the table, what each column means."""
    s, o = p["settings"], p["original"]
    st = o["pipeline"]["stages"]
    cols = ["row", "Δm (nats)", "Δm / true sources", "accuracy after", "removed (shared)",
            "sources removed", "own sources in top-k", "MRR", "recall@10", "score s",
            "retrain s", "note"]
    return "".join([
        "# Counterfactual truth on the real model (leave-top-k-out, both stages)\n\n",
        f"Status: **{p['status']}**. Model: {s['model']} — {s['model_note']}. Preset "
        f"`{s['preset']}`: {s['n_documents']} documents, {s['n_questions']} held-out "
        f"questions, {s['layers_tracked']} tracked by EK-FAC ({s['tracked_layers']} layers, "
        f"{s['tracked_params'] / 1e6:.1f}M parameters), k = {s['k']}, {s['threads']} thread(s)"
        f"{', MSIF_FAST (plumbing, not a result)' if s['fast'] else ''}.\n\n",
        f"Original run (`{o['pipeline']['folder']}`, {o['pipeline']['threads']} thread(s)): "
        f"held-out −log p(answer + eos) {st['base']['heldout_nll_mean']:.2f} (base) → "
        f"{st['pretrained']['heldout_nll_mean']:.2f} (θ_pt) → "
        f"{st['finetuned']['heldout_nll_mean']:.2f} nats (θ_ft); greedy accuracy at θ_ft "
        f"{np.mean(o['correct']):.2f} — m is measured on the given answer, which θ_ft does not "
        f"always say. Mean m at θ_ft: {np.mean(o['m']):.3f} nats.\n\n",
        f"Measurement: {s['measurement']}. Removal: {s['removal']}. Δm: mean ± standard error "
        "over the questions of m(retrained) − m(original); 'removed (shared)': documents "
        "removed (of them, in more than one question's top-k); 'sources removed': how many "
        "of them are true sources (of any question); 'own sources in top-k': each question's "
        "top-k against its own sources, summed over the questions; MRR / recall@10: fact "
        "tracing of each question's true sources among all documents; 'score s': scoring "
        "time (the EK-FAC fits of both "
        f"stages, {p['fit']['fit_s']:.0f} s, come before).\n\n",
        markdown_table(table_rows(p), cols),
        "\nPer question: m at θ_ft (nats), whether θ_ft says the answer greedily, and Δm of "
        "each removal row.\n\n",
        markdown_table(*question_rows(p)),
        f"\nWall time: {p['timings_s']['wall_all_invocations'] / 60:.1f} min in all "
        f"invocations of this run (this one: {p['timings_s']['wall_this_invocation'] / 60:.1f} "
        f"min); the stages' own times (the original run's two stages, the fits, scoring, "
        f"retrains) add up to {p['timings_s']['compute_incl_cached'] / 60:.1f} min. Command: "
        f"`{s['command']}`.\n",
    ])  # fmt: skip


def plot(p: dict, path: Path) -> None:
    """Δm per removal row (mean ± s.e.) with the seed-noise band; MRR and recall@10."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    a, b = fig.subplots(1, 2)
    rm = p["removal"]
    names = sorted(rm, key=lambda n: rm[n]["dm_mean"])
    a.barh(names, [rm[n]["dm_mean"] for n in names], xerr=[rm[n]["dm_sem"] for n in names],
           color=["tab:gray" if n in ("none", "noise") else "tab:red" for n in names])
    if "noise" in rm:
        lo = rm["noise"]["dm_mean"] - 2 * rm["noise"]["dm_sem"]
        hi = rm["noise"]["dm_mean"] + 2 * rm["noise"]["dm_sem"]
        a.axvspan(lo, hi, color="tab:blue", alpha=0.15, label="seed noise (mean ± 2 s.e.)")
        a.legend(loc="best")
    a.axvline(0, c="black", lw=0.8)
    a.set(xlabel="Δm = rise of −log p(answer), nats (mean ± s.e. over questions)",
          title=f"remove each question's top-{p['settings']['k']}, retrain both stages")
    ms = list(p["methods"])
    y = np.arange(len(ms))
    b.barh(y - 0.2, [p["methods"][m]["mrr"] for m in ms], 0.4, label="MRR")
    b.barh(y + 0.2, [p["methods"][m]["recall_at_10"] for m in ms], 0.4, label="recall@10")
    b.set_yticks(y, ms)
    b.set(xlim=(0, 1), title="fact tracing over all documents")
    b.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

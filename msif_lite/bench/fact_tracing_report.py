"""The results/fact_tracing.{md,png} report of `msif-lite bench fact-tracing`."""

from __future__ import annotations

from msif_lite.bench.common import format_mean_std


def _rows(d: dict, label: str) -> list[dict]:
    return [{label: k, "MRR": format_mean_std(v, "mrr"),
             "Recall@10": format_mean_std(v, "recall10")}
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
        f"({s['n_queries_available']} pre-training-only queries exist), "
        f"{s['pools']['n_draws']} draws, "
        f"{s['mean_candidates_per_query']:.0f} candidates per query on average; mean ± "
        f"{s['mrr_std']}. α (trained) = {s['alpha_trained']:g}. Fast mode: {s['fast']}.\n",
        "\n## Methods\n\nEvery registered method (`msif-lite methods`). `bm25` and "
        "`embedding` are queried with question + answer, the input the gradient methods get; "
        "`*_question` rows see the question only (the paper's baseline input).\n\n",
        markdown_table(_rows(p["methods"], "method"), ["method", *cols]),
        "\n## Multi-stage: pre-training damping λ_pt (α = trained)\n\n",
        markdown_table(_rows(p["damping_sweep"], "λ_pt"), ["λ_pt", *cols]),
        "\n## Multi-stage: α (× trained α; λ_pt heuristic)\n\n",
        markdown_table(_rows(p["alpha_sweep"], "α factor"), ["α factor", *cols]),
        "\n## Layers\n\n", markdown_table(_rows({"all": lay["all"], "mlp": lay["mlp"]},
                                              "layers"), ["layers", *cols]),
        "\nMLP share of the multi-stage score: "
        + ", ".join(f"{k} = {v:.3f}" for k, v in lay["mlp_share"].items() if k != "definition")
        + f".\n\n{lay['mlp_share']['definition']}\n",
        f"\n## Embedding-retrieved candidates (top-{s['pools']['embedding_k']}, no oracle; "
        "true sources "
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
    from matplotlib.figure import Figure

    paths = []
    m = p["methods"]
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    colour = {"embedding": "tab:orange", "bm25": "tab:orange", "embedding_question": "tab:gray",
              "bm25_question": "tab:gray", "random": "black",
              "multi_stage": "tab:red"}  # others: gradient methods
    ax.bar(list(m), [v["mrr_mean"] for v in m.values()],
           yerr=[v["mrr_std"] for v in m.values()], capsize=4,
           color=[colour.get(k, "tab:blue") for k in m])  # fmt: skip
    ax.set(title="Fact tracing: MRR per method (mean ± std over draws)\nred: multi-stage, "
           "blue: gradient, orange: text (question + answer), grey: text (question only)",
           ylabel="MRR",
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
            fig = Figure(figsize=(6, 3.8))
            ax = fig.subplots()
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
        paths.append(path)
    return paths

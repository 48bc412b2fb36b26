"""results/unrolled.{md,png} from `bench unrolled`'s payload (no BENCH: not a benchmark)."""

from __future__ import annotations

from msif_lite.bench.common import markdown_table


def _f(v: dict | None, key: str = "mean", err: str = "sem") -> str:
    return "" if not v else f"{v[key]:.3f} ± {v[err]:.3f}"


def _rows(w: dict, ctx: dict) -> list[dict]:
    rm, cost = w.get("top_k_removal", {}), (w.get("cost") or {}).get("method_s_per_query", {})
    lin = w.get("linear_prediction", {})
    rows = []
    for m, v in sorted(w["methods"].items(), key=lambda kv: -kv[1]["lds_mean"]):
        allq = ctx.get("methods", {}).get(m)
        rows.append({
            "method": m, "LDS (these questions)": _f(v, "lds_mean", "lds_sem"),
            "paired − multi_stage": _f(w["paired_vs_multi_stage"].get(m)),
            "LDS (all 52, bench lds)": _f(allq, "lds_mean", "lds_sem"),
            "Δm targets": f"{rm[m]['dm_targets_mean']:.2f}" if m in rm else "",
            "Δm linear": f"{rm[m]['dm_targets_linear']:.2f}"
            if "dm_targets_linear" in rm.get(m, {}) else "",
            "Δm others": f"{rm[m]['dm_others_mean']:.2f}" if m in rm else "",
            "subset r (linear)": _f(lin.get(m), "pearson_mean", "pearson_sem"),
            "s/query": f"{cost[m]:.0f}" if m in cost else "",
            "cross-query ρ": f"{v['cross_query_spearman']:.2f}"
            if "cross_query_spearman" in v else "",
        })  # fmt: skip
    rows += [{"method": f"({m})", "Δm targets": f"{rm[m]['dm_targets_mean']:.2f}",
              "Δm others": f"{rm[m]['dm_others_mean']:.2f}"}
             for m in ("true_sources", "none") if m in rm]  # fmt: skip
    return rows


COLUMNS = ["method", "LDS (these questions)", "paired − multi_stage", "LDS (all 52, bench lds)",
           "Δm targets", "Δm linear", "Δm others", "subset r (linear)", "cross-query ρ",
           "s/query"]


def _cost_md(c: dict | None) -> str:
    if not c:
        return ""
    passes = ", ".join(f"{k} {v:.0f} s" for k, v in c["pass_s_per_query"].items())
    passes = passes + "; the" if passes else "the"
    return (f"\nCost per question (blocks of {c['block']}, one CPU thread): {passes} "
            f"pre-training replay {c['pretrain_replay_s']:.0f} s once per world; peak memory "
            f"of the unrolled methods {c['peak_mb']:.0f} MB (resident-set growth). "
            f"{c['note']}.\n")


def _decomposition_md(w: dict) -> str:
    m = w["methods"]
    if not {"multi_stage", "unrolled_finetune_only", "unrolled"} <= set(m):
        return ""
    a, b, c = (m[k]["lds_mean"] for k in ("multi_stage", "unrolled_finetune_only", "unrolled"))
    nc = w["noise_ceiling"]["mean"]
    lin = w["linear_prediction"].get("unrolled", {})
    return (f"\nDecomposition of the influence gap (LDS on these questions): multi_stage "
            f"{a:.3f} → exact fine-tune path {b:.3f} ({b - a:+.3f}) → exact pre-training path "
            f"too (unrolled) {c:.3f} ({c - b:+.3f}); what remains to the noise ceiling "
            f"{nc:.3f} ({nc - c:+.3f}) is finite removal (first order vs retraining) and the "
            f"subset's noise. Unrolled's linear prediction of the retrained subsets: Pearson "
            f"r {lin.get('pearson_mean', float('nan')):.3f}, predicted spread / measured "
            f"spread (median over questions) {lin.get('spread_ratio_median', float('nan')):.3g}, "
            f"mean predicted Δm {lin.get('pred_dm_mean', float('nan')):.3g} vs measured "
            f"{lin.get('measured_dm_mean', float('nan')):.3g} nats.\n")


def _ablation_md(w: dict) -> str:
    """The SOURCE / influence-at-checkpoints ablations next to their two ends."""
    m = w["methods"]
    if not {"source", "if_checkpoints"} & set(m):
        return ""
    names = [n for n in ("multi_stage", "if_checkpoints", "source", "unrolled_finetune_only",
                         "unrolled") if n in m]  # fmt: skip
    parts = ", ".join(f"{n} {m[n]['lds_mean']:.3f}" for n in names)
    return (f"\nAblations (LDS on these questions): {parts}. if_checkpoints: multi_stage with "
            f"its pre-training factor averaged over equally spaced pre-training checkpoints; "
            f"source: SOURCE, the run unrolled approximately in segments with EK-FAC per "
            f"segment (attribution.source_methods).\n")


def _fixed_order_md(w: dict) -> str:
    f = w.get("fixed_order")
    if not f:
        return ""
    rows = [{"method": n, "LDS, fixed order (w = mask)": _f(v["fixed_order"]),
             "LDS, retrained (reshuffled), same subsets": _f(v["reshuffled"])}
            for n, v in f.items() if isinstance(v, dict) and "fixed_order" in v]
    rows.sort(key=lambda r: r["LDS, fixed order (w = mask)"], reverse=True)
    rho = sum(f["truths_spearman"]) / len(f["truths_spearman"])
    lin = f.get("unrolled_linear", {})
    return (f"\n### The counterfactual the derivative linearises: {f['n_subsets']} subsets "
            f"replayed in the run's own batch order\n\nEach of the first {f['n_subsets']} "
            f"subsets replayed with w = mask (removed documents weigh 0 in their batches; order "
            f"and normalisers kept) instead of retrained on the subset (which reshuffles). "
            f"Spearman between the two truths over these subsets, mean over questions: "
            f"{rho:.3f}. Unrolled's linear prediction of the fixed-order replays: Pearson r "
            f"{lin.get('pearson_mean', float('nan')):.3f}, spread ratio "
            f"{lin.get('spread_ratio_median', float('nan')):.3g}.\n\n"
            + markdown_table(rows, ["method", "LDS, fixed order (w = mask)",
                                    "LDS, retrained (reshuffled), same subsets"]))


def markdown(payload: dict) -> str:
    out = ["# Unrolled metagradients through both stages against retraining (issue 25)\n"]
    for name, w in payload["worlds"].items():
        ctx = payload.get("lds_json", {}).get(name.split("@")[0], {})
        nc, nca = w["noise_ceiling"], w["noise_ceiling_all_queries"]
        s = w["settings"]
        out += [
            f"\n## World `{name}`: {w['n_documents']} documents, {len(w['queries'])} questions "
            f"(one per entity), {w['n_subsets']} subsets keeping {w['fraction_kept']:g} of "
            f"the corpus, {w['n_noise']} re-seeded\n\n",
            f"Ground truth `{s['ground_truth']}`. Noise ceiling on these questions "
            f"**{_f(nc)}** (all questions: {_f(nca)}). LDS: mean ± s.e. over the questions; "
            f"paired: LDS(method) − LDS(multi_stage) per question. Δm: rise of −log p(answer) "
            f"on the targets after removing each target's top-k documents by the method (all "
            f"targets in one retrain); Δm linear: the method's own first-order prediction of "
            f"that rise, Σ_removed I(z, q) (meaningful for the unrolled scores only, which "
            f"are −dm/dw in nats); subset r: Pearson of the linear prediction and the "
            f"measured m over the ground truth's subsets; cross-query ρ: mean Spearman between "
            f"two questions' score rows (near 1: one query-independent component). "
            f"Command: `{s.get('command', '')}`; "
            f"wall time {w['timings_s']['total']:.0f} s.\n\n",
            markdown_table(_rows(w, ctx), COLUMNS),
            _cost_md(w.get("cost")), _decomposition_md(w), _ablation_md(w), _fixed_order_md(w),
        ]
    return "".join(out)

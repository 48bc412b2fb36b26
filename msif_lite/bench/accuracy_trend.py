"""Exp 1 as the fit set grows to the whole pre-training corpus, and a damping sweep.

    msif-lite bench accuracy-trend [--preset lds] [--sizes 64 128 0] [--damping-rel 0.1]
        [--sweep 0.01 1 5] [--sweep-size 64] [--runs runs/accuracy_trend] [--reuse]
        [--ingredients runs/<a --block-truth run>] [--out results]
        [-- <more `bench accuracy` arguments>]

Every run is `msif-lite bench accuracy` with G = the exact GGN over the fit set and every
approximation (EK-FAC, K-FAC, with 1, 4 and 16 label draws) fitted on the same documents;
size 0 is the whole corpus the model was pre-trained on. One run per size at the headline
damping (λ = damping_rel · trace(G)/P), then the sweep at `--sweep-size` documents. After every
run (and, inside a run, after every method, in <runs>/<name>/partial.json) the results so far
are composed into <out>/accuracy.{json,md,png} and <out>/accuracy_trend.png, so a killed run
loses at most the method in progress. The headline is the largest fit set done so far at the
headline damping; `partial: true` until every run is done. `--reuse` takes finished runs from
<runs>/<name>/accuracy.json instead of rerunning them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from msif_lite.bench import accuracy, common
from msif_lite.engine.storage import atomic_write_json

TREND_METHODS = ("ekfac", "kfac", "grad_dot", "cg_", "lissa_")  # name prefixes (block_exact out)
PAPER_EKFAC, PAPER_MARGIN = 0.612, 0.612 - 0.219


def parse_args(argv):
    p = argparse.ArgumentParser(prog="msif-lite bench accuracy-trend",
                                description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="lds", help="shipped pipeline (its world = the corpus)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 0],
                   help="fit-set sizes (0: the whole pre-training corpus)")
    p.add_argument("--damping-rel", type=float, default=0.1, help="headline λ / (trace(G)/P)")
    p.add_argument("--sweep", type=float, nargs="*", default=[0.01, 1.0, 5.0],
                   help="further λ / (trace(G)/P) at --sweep-size documents")
    p.add_argument("--sweep-size", type=int, default=64)
    p.add_argument("--runs", default="runs/accuracy_trend", help="one directory per run")
    p.add_argument("--reuse", action="store_true", help="reuse finished runs")
    p.add_argument("--compose-only", action="store_true",
                   help="run nothing: compose <out>/accuracy.* from the finished runs and the "
                        "partial.json of unfinished ones (methods done before it stopped)")
    p.add_argument("--out", default="results")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ingredients", nargs="*", default=[],
                   help="directories of finished `bench accuracy --block-truth` runs to add to "
                        "the ingredient split (the trend's own runs count if they have a block "
                        "truth)")
    p.add_argument("--note", action="append", default=[],
                   help="a remark on the run for the markdown (e.g. about the machine's load)")
    args, extra = p.parse_known_args(argv)
    args.extra = [a for a in extra if a != "--"]
    return args


def plan(args) -> list[tuple[str, int, float]]:
    """(run name, fit size, λ rel) in the order they run: the trend first, then the sweep."""
    runs = [(f"fit{n or 'all'}_lam{args.damping_rel:g}", n, args.damping_rel)
            for n in args.sizes]  # fmt: skip
    runs += [(f"fit{args.sweep_size or 'all'}_lam{r:g}", args.sweep_size, r)
             for r in args.sweep if r != args.damping_rel]  # fmt: skip
    return runs


def bench_args(args, n: int, rel: float, out: Path) -> argparse.Namespace:
    return accuracy.parse_args(["--preset", args.preset, "--fit", str(n), "--damping-rel",
                                str(rel), "--threads", str(args.threads), "--out", str(out),
                                *args.extra])  # fmt: skip


def trend_rows(runs: dict, rel: float) -> list[dict]:
    """One row per fit-set size × method at the headline damping."""
    rows = []
    for name, p in runs.items():
        s = p["settings"]
        if abs(s["damping_rel_to_mean_eig"] - rel) > 1e-6 * rel:
            continue
        methods = [m for m in accuracy.ordered(p["methods"]) if m.startswith(TREND_METHODS)]
        for m in methods:
            r = p["methods"][m]
            rows.append({
                "run": name, "n_fit_docs": s["n_fit_docs"], "n_corpus_docs": s["n_corpus_docs"],
                "whole_corpus": s["whole_corpus"], "method": m,
                "spearman_mean": r["spearman_mean"], "spearman_std": r["spearman_std"],
                "pearson_mean": r["pearson_mean"], "damping": s["damping"],
                "damping_rel_to_mean_eig": s["damping_rel_to_mean_eig"],
                "fit_s": r["fit_s"], "score_s": r["score_s"],
                "ground_truth_residual_max": max(s["ground_truth_relative_residual"]),
                "ground_truth_iterations_max": max(s["ground_truth_iterations"]),
            })  # fmt: skip
    return sorted(rows, key=lambda r: r["n_fit_docs"])


def sweep_rows(runs: dict, size_docs: int) -> list[dict]:
    """The damping sweep at one fit-set size: one row per λ × method."""
    rows = []
    for name, p in runs.items():
        s = p["settings"]
        if s["n_fit_docs"] != size_docs:
            continue
        for m in ("ekfac", "ekfac_draws16", "kfac_draws16", "grad_dot", "cg_10", "cg_30"):
            if m in p["methods"]:
                r = p["methods"][m]
                rows.append({"run": name, "n_fit_docs": s["n_fit_docs"], "method": m,
                             "damping_rel_to_mean_eig": s["damping_rel_to_mean_eig"],
                             "damping": s["damping"], "condition_number":
                             p["setup"]["condition_number"], "spearman_mean": r["spearman_mean"],
                             "spearman_std": r["spearman_std"]})  # fmt: skip
    return sorted(rows, key=lambda r: r["damping_rel_to_mean_eig"])


INGREDIENT_METHODS = ("block_exact", "ekfac", "ekfac_draws16", "kfac", "kfac_draws16", "grad_dot")


def ingredient_rows(runs: dict) -> list[dict]:
    """The split of EK-FAC's error, from every run with an exact block-diagonal solve: the
    cross-layer blocks (block_exact vs the full exact solve) and the per-layer Kronecker model
    (each method vs block_exact, the matrix K-FAC and EK-FAC approximate)."""
    rows = []
    for name, p in runs.items():
        if "block_exact" not in p["methods"]:
            continue
        s = p["settings"]
        for m in INGREDIENT_METHODS:
            if m in p["methods"]:
                r = p["methods"][m]
                rows.append({"run": name, "n_fit_docs": s["n_fit_docs"], "method": m,
                             "n_queries": p["setup"]["n_queries"],
                             "damping_rel_to_mean_eig": s["damping_rel_to_mean_eig"],
                             "spearman_vs_truth": r["spearman_mean"],
                             "spearman_vs_block_exact": r["vs_block_exact"]["spearman_mean"],
                             "block_exact_residual_max":
                                 p["methods"]["block_exact"]["relative_residual_max"]})  # fmt: skip
    return rows


def _pivot(rows: list[dict], col_key: str, col_fmt) -> str:
    """A methods × columns markdown table of 'mean ± std' Spearman."""
    cols = sorted({r[col_key] for r in rows})
    methods = accuracy.ordered({r["method"] for r in rows})
    table = []
    for m in methods:
        cells = {col_fmt(r[col_key]): common.format_mean_std(r, "spearman")
                 for r in rows if r["method"] == m}  # fmt: skip
        table.append({"method": m, **cells})
    return common.markdown_table(table, ["method", *[col_fmt(c) for c in cols]])


def paired(methods: dict, a: str, b: str) -> dict:
    """Spearman of a minus that of b on the same queries: mean, its standard error (std/√n
    of the per-query differences) and in how many queries a is ahead."""
    d = [x - y for x, y in zip(methods[a]["spearman_per_query"], methods[b]["spearman_per_query"])]
    n = len(d)
    se = statistics.stdev(d) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": statistics.fmean(d), "se": se, "wins": sum(x > 0 for x in d), "n": n}


def gap(head: dict, trend: list[dict], sweep: list[dict], ingredients: list[dict] = ()) -> dict:
    """EK-FAC vs the paper, and what each ingredient measured here changes (Spearman)."""
    m = head["methods"]
    out = {"ekfac": m["ekfac"]["spearman_mean"], "grad_dot": m["grad_dot"]["spearman_mean"],
           "paper_ekfac": PAPER_EKFAC, "paper_margin_over_grad_dot": PAPER_MARGIN}  # fmt: skip
    out["margin_over_grad_dot"] = out["ekfac"] - out["grad_dot"]
    out["margin_paired"] = paired(m, "ekfac", "grad_dot")
    out["reaches_paper_ekfac"] = out["ekfac"] >= PAPER_EKFAC
    out["reaches_paper_margin"] = out["margin_over_grad_dot"] >= PAPER_MARGIN
    for r in (4, 16):
        if f"ekfac_draws{r}" in m:
            out[f"label_draws_{r}_minus_1"] = m[f"ekfac_draws{r}"]["spearman_mean"] - out["ekfac"]
            out[f"label_draws_{r}_paired"] = paired(m, f"ekfac_draws{r}", "ekfac")
    ek = [r for r in trend if r["method"] == "ekfac"]
    if len(ek) > 1:
        out["fit_set"] = {"from_docs": ek[0]["n_fit_docs"], "to_docs": ek[-1]["n_fit_docs"],
                          "ekfac_change": ek[-1]["spearman_mean"] - ek[0]["spearman_mean"]}
    by_lam = {}
    for r in sweep:
        by_lam.setdefault(r["damping_rel_to_mean_eig"], {})[r["method"]] = r["spearman_mean"]
    out["damping_margin_ekfac_minus_grad_dot"] = {
        f"{lam:g}": v["ekfac"] - v["grad_dot"] for lam, v in sorted(by_lam.items())
        if "ekfac" in v and "grad_dot" in v}  # fmt: skip
    largest = max((r["n_fit_docs"] for r in ingredients), default=None)
    for r in ingredients:  # the split at the largest fit set with a block truth
        if r["n_fit_docs"] == largest:
            out.setdefault("ingredients", {"n_fit_docs": r["n_fit_docs"],
                                           "damping_rel": r["damping_rel_to_mean_eig"]})
            out["ingredients"][r["method"]] = {"vs_truth": r["spearman_vs_truth"],
                                               "vs_block_exact": r["spearman_vs_block_exact"]}
    return out


def markdown(payload: dict) -> str:
    s, g = payload["settings"], payload["gap"]
    partial = "**PARTIAL** (not every planned run has finished): " if payload["partial"] else ""
    head = accuracy.markdown(payload)
    trend = _pivot(payload["trend"], "n_fit_docs",
                   lambda n: f"{n} docs" + (" (whole corpus)" if n == s["n_corpus_docs"] else ""))
    sweep = _pivot(payload["damping_sweep"], "damping_rel_to_mean_eig", lambda x: f"λ={x:g}·tr/P") \
        if payload["damping_sweep"] else "(no sweep run yet)\n"
    lines = [f"- EK-FAC {g['ekfac']:.3f} vs the paper's {PAPER_EKFAC}: "
             f"{'reached' if g['reaches_paper_ekfac'] else 'not reached'}; margin over the "
             f"gradient dot product {g['margin_over_grad_dot']:+.3f} vs the paper's "
             f"{PAPER_MARGIN:+.3f}: {'reached' if g['reaches_paper_margin'] else 'not reached'}."]
    if "margin_paired" in g:
        mp = g["margin_paired"]
        lines.append(f"- the margin query by query: {mp['mean']:+.3f} ± {mp['se']:.3f} (standard "
                     f"error), EK-FAC ahead in {mp['wins']} of {mp['n']} queries")
    for r in (4, 16):
        if f"label_draws_{r}_minus_1" in g:
            lines.append(f"- label draws 1 → {r}: {g[f'label_draws_{r}_minus_1']:+.3f}")
    if "fit_set" in g:
        f = g["fit_set"]
        lines.append(f"- fit set {f['from_docs']} → {f['to_docs']} documents (EK-FAC): "
                     f"{f['ekfac_change']:+.3f}")
    for lam, d in g["damping_margin_ekfac_minus_grad_dot"].items():
        lines.append(f"- λ = {lam}·tr(G)/P ({s['sweep_size']} docs): EK-FAC − gradient dot "
                     f"product = {d:+.3f}")
    ingredients = ""
    if payload.get("ingredients"):
        table = [{"run": r["run"], "docs": r["n_fit_docs"], "queries": r["n_queries"],
                  "λ/(tr/P)": f"{r['damping_rel_to_mean_eig']:g}", "method": r["method"],
                  "vs exact solve": f"{r['spearman_vs_truth']:.3f}",
                  "vs exact block-diagonal": f"{r['spearman_vs_block_exact']:.3f}"}
                 for r in payload["ingredients"]]  # fmt: skip
        ingredients = (
            "\n## Ingredients: the cross-layer blocks and the per-layer Kronecker model\n\n"
            "Spearman of each method against the exact solve with the full G and against the "
            "exact solve with its per-layer blocks only (block_exact: what K-FAC and EK-FAC "
            "approximate). block_exact vs the exact solve is what dropping the cross-layer "
            "blocks costs; EK-FAC vs block_exact is what the Kronecker eigenbasis and the "
            "sampled labels cost on top.\n\n"
            + common.markdown_table(table, list(table[0])))
    return (
        f"{partial}{head}\n## Trend: Spearman vs the exact solve as the fit set grows "
        f"(λ = {s['damping_rel_to_mean_eig']:g}·trace(G)/P of each G)\n\n"
        f"G and every approximation on the same n documents; {s['n_corpus_docs']} documents "
        "are the whole pre-training corpus of the model's world.\n\n" + trend
        + f"\n## Damping sweep ({s['sweep_size']} documents)\n\n" + sweep
        + ingredients
        + "\n## EK-FAC against the paper\n\n" + "\n".join(lines) + "\n"
    )


def plot(payload: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    rows = payload["trend"]
    for m in accuracy.ordered({r["method"] for r in rows}):
        pts = [(r["n_fit_docs"], r["spearman_mean"]) for r in rows if r["method"] == m]
        ax.plot(*zip(*pts), "o-", label=m, lw=2 if m in ("ekfac", "grad_dot") else 1)
    ax.axhline(PAPER_EKFAC, color="r", ls=":", lw=1, label="paper EK-FAC 0.612")
    ax.axhline(0.219, color="grey", ls=":", lw=1, label="paper grad_dot 0.219")
    ax.set(xscale="log", xlabel="documents G and the factors are fitted on",
           ylabel="Spearman ρ vs exact solve", ylim=(0, 1))
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compose(args, runs: dict, done: bool) -> common.BenchResult | None:
    """Write <out>/accuracy.* from the finished runs (headline: the largest fit set); None
    while no run at the headline damping has finished."""
    heads = [p for p in runs.values()
             if abs(p["settings"]["damping_rel_to_mean_eig"] - args.damping_rel) < 1e-6]
    if not heads:
        return None
    head = max(heads, key=lambda p: p["settings"]["n_fit_docs"])
    sweep_docs = args.sweep_size or head["settings"]["n_corpus_docs"]
    trend, sweep = trend_rows(runs, args.damping_rel), sweep_rows(runs, sweep_docs)
    extra = {Path(d).name: json.loads((Path(d) / "accuracy.json").read_text())
             for d in args.ingredients if (Path(d) / "accuracy.json").is_file()}
    ingredients = ingredient_rows({**runs, **extra})
    payload = {k: v for k, v in head.items() if k != "environment"}
    payload["settings"] = {**head["settings"], "sweep_size": sweep_docs,
                           "planned_runs": [n for n, *_ in plan(args)],
                           "finished_runs": sorted(runs)}  # fmt: skip
    payload.update(partial=not done, trend=trend, damping_sweep=sweep, ingredients=ingredients,
                   gap=gap(head, trend, sweep, ingredients), run_notes=list(args.note))
    result = common.finish("accuracy", payload, markdown(payload), args.out, quiet=True)
    accuracy.plot(payload, result.json_path.with_suffix(".png"))
    plot(payload, result.json_path.parent / "accuracy_trend.png")
    return result


def main(argv: Sequence[str] | None = None) -> common.BenchResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs: dict[str, dict] = {}
    shipped = label = None
    todo = plan(args)
    for name, n, rel in todo:
        out = Path(args.runs) / name
        done_file = out / "accuracy.json"
        if (args.reuse or args.compose_only) and done_file.is_file():
            runs[name] = json.loads(done_file.read_text())
            continue
        if args.compose_only:
            part = out / "partial.json"
            p = json.loads(part.read_text()) if part.is_file() else {}
            if "settings" in p:  # the ground truth was done: its methods so far count
                runs[name] = p
            continue
        if shipped is None:
            shipped, label = accuracy.load(bench_args(args, n, rel, out))
        print(f"== {name}", flush=True)
        b = bench_args(args, n, rel, out)
        out.mkdir(parents=True, exist_ok=True)
        payload = accuracy.run(shipped, b, label, on_update=lambda p, out=out: atomic_write_json(
            out / "partial.json", {**p, "partial": True}))  # fmt: skip
        common.write_results("accuracy", payload, accuracy.markdown(payload), out)
        runs[name] = payload
        compose(args, runs, done=len(runs) == len(todo))
    result = compose(args, runs, done=all("partial" not in p for p in runs.values())
                     and len(runs) == len(todo))  # fmt: skip
    if result is None:
        raise ValueError(f"no finished run at λ = {args.damping_rel:g}·trace(G)/P under "
                         f"{args.runs}: nothing to compose")  # fmt: skip
    print(f"wrote {result.json_path}")
    return result


BENCH = common.Benchmark("accuracy-trend", "Exp 1 as the fit set grows to the whole corpus, "
                         "a damping sweep and the ingredient split (composes `bench accuracy` "
                         "runs into results/accuracy.*)", main)  # fmt: skip

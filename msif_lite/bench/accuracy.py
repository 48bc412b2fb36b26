"""Experiment 1 of arXiv 2505.05017: how well does each inverse-HVP approximate (G + λI)⁻¹?

Single-stage influence at θ_pt,  I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z),  m = −log p(answer | prompt),
G = the exact GGN of the pre-training loss over a fixed set of fitting documents (per-sequence
token sums, averaged over sequences). Every method sees the same data and the same absolute λ.
Ground truth: conjugate gradient on the full G over all tracked linear layers (not block-diagonal),
batched over the queries, run until ‖b − (G + λI)x‖ / ‖b‖ < tol for every query.

Run: `msif-lite bench accuracy [--queries 10 --candidates 500 --out results]` — by default on
the paper's toy shape (`--preset paper-toy`, trained once into .cache/trained/ if absent);
`--preset default` uses the shipped gpt-neox-mini. `--block-truth` adds the exact
block-diagonal solve, to separate what dropping cross-layer blocks costs from what the
Kronecker factorisation costs. MSIF_FAST=1 shrinks everything (and uses the shipped model).
Writes <out>/accuracy.json, .md and .png. The measurement itself is
msif_lite/bench/accuracy_run.py; `msif-lite bench accuracy-trend` composes runs of this one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from msif_lite.bench import common
from msif_lite.bench.accuracy_run import AccuracyRun, correlations
from msif_lite.config import pick
from msif_lite.world.shipped import load_shipped, trained_pipeline

PAPER = {  # docs/design.md §Yardsticks: the paper's code (GPT-NeoX on PTB, 10 q × 500 c)
    "setup": "ground truth CG over all parameters, 2000 iterations, damping 1e-4",
    "spearman": {"cg_1000": 0.770, "ekfac": 0.612, "ekfac_mlp": 0.523, "lissa_10000": 0.518,
                 "lissa_2000": 0.409, "grad_dot": 0.219, "trak": 0.013},
    "time": {"cg_1000": "4569 s", "ekfac": "35.7 s scoring + 4204 s factor fitting",
             "ekfac_mlp": "29.6 s", "lissa_10000": "45,129 s", "lissa_2000": "9062 s"},
}  # fmt: skip
PAPER_ROW = {"cg_small": None, "cg_large": "cg_1000", "lissa_small": "lissa_2000",
             "lissa_large": "lissa_10000"}  # our budget → the paper's closest row  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="msif-lite bench accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=pick(10, 3), help="world queries (default 10)")
    p.add_argument("--candidates", type=int, default=pick(500, 40), help="candidate documents")
    p.add_argument("--fit", type=int, default=pick(64, 8),
                   help="documents G and the factors are fitted on (0: the whole corpus)")
    p.add_argument("--damping-rel", type=float, default=pick(5.0, 300.0),
                   help="λ = this × trace(G)/P (the mean GGN eigenvalue)")
    p.add_argument("--damping", type=float, help="absolute λ (overrides --damping-rel)")
    p.add_argument("--tol", type=float, default=1e-7, help="ground-truth CG tolerance")
    p.add_argument("--converged-below", type=float, default=1e-6,
                   help="a query counts as converged when its recomputed residual is below this")
    p.add_argument("--max-iter", type=int, default=pick(1000, 500), help="ground-truth CG cap")
    p.add_argument("--products", choices=("float32", "float64"), default="float32",
                   help="precision of the G·v products in every solver (the CG recurrences, "
                        "the refinement residuals and the final residual check stay float64)")
    p.add_argument("--gt-time-limit", type=float,
                   help="ground truth (and --block-truth): stop CG after this many seconds (the "
                        "residual it reached is reported; a budget for a shared machine)")
    p.add_argument("--refine", type=int, default=3,
                   help="ground truth: rounds of iterative refinement with float64 residuals")
    p.add_argument("--precondition", choices=("ekfac", "none"), default="none",
                   help="ground truth: preconditioned CG with the EK-FAC of the most label "
                        "draws (the same exact solution; at small λ it did not cut the "
                        "iterations on the kit's models) or plain CG (default; its first k "
                        "iterates are the cg_k rows)")
    p.add_argument("--cg", type=int, nargs=2, default=pick([10, 30], [2, 8]), help="CG budgets")
    p.add_argument("--lissa", type=int, nargs=2, default=pick([50, 200], [5, 20]),
                   help="LiSSA depths")
    p.add_argument("--probes", type=int, default=pick(20, 4), help="Hutchinson probes")
    p.add_argument("--power-iters", type=int, default=pick(20, 8), help="for λ_max(G)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="where every method runs (e.g. cuda)")
    p.add_argument("--block-truth", action="store_true",
                   help="also solve with the exact block-diagonal GGN (what K-FAC/EK-FAC "
                        "approximate; each block linearised on its own layer, ~4.6× a full G·v "
                        "per iteration on the lds model) and correlate every method with it too")
    p.add_argument("--label-draws", type=int, nargs="*", default=pick([4, 16], [2]),
                   help="extra rows ekfac_draws<R>/kfac_draws<R>: factors fitted with R sampled "
                        "labels per token (the documents repeated R times) instead of one, to "
                        "show how much of the gap is Monte-Carlo noise of the sampled Fisher")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=pick("paper-toy", "default"),
                   help="pipeline preset: shipped under data/ (default), else trained once into "
                        ".cache/trained/<preset> (paper-toy: the paper's 2-layer GPT-NeoX, hidden "
                        "256, on the kit's default world; ~5 min on 2 CPU cores)")
    p.add_argument("--world", help="world directory (default data/world/<preset>)")
    p.add_argument("--checkpoints", help="directory with pretrained/ and finetuned/")
    p.add_argument("--out", default="results", help="where accuracy.json/.md go")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def payload_of(r: AccuracyRun, args: argparse.Namespace, model_label: str) -> dict:
    """The JSON payload of a run so far: every method scored, correlated with the ground truth
    once it is known (before that, the methods' timings only)."""
    if not hasattr(r, "gt_info"):
        return {"methods": r.results}
    for name in r.results:
        r.results[name].update(correlations(r.scores[name], r.truth))
    gt = r.ground_truth_info()
    settings = {"n_fit_docs": len(r.fit_ids), "n_corpus_docs": r.n_corpus,
                "whole_corpus": len(r.fit_ids) == r.n_corpus, "damping": r.lam,
                "damping_rel_to_mean_eig": r.lam / r.mean_eig, "products": args.products,
                "ground_truth_relative_residual": gt["relative_residual"],
                "ground_truth_iterations": gt["iterations"]}  # fmt: skip
    return {"methods": r.results, "ground_truth": gt, "settings": settings,
            "setup": r.setup_info(model_label), "paper": PAPER}


def run(shipped, args: argparse.Namespace, model_label: str,
        on_update: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Fit, solve and score with every method; returns the JSON payload. on_update gets the
    payload so far after every method (to write partial results as the run goes)."""
    r = AccuracyRun(shipped, args)
    if on_update is not None:
        r.on_update = lambda: on_update(payload_of(r, args, model_label))
    r.spectrum()
    r.approximations()
    r.iterative()
    if args.block_truth:
        r.block_truth()
    return payload_of(r, args, model_label)


def ordered(names) -> list[str]:
    """Table order: the curvature approximations (EK-FAC, K-FAC, then any other registered
    curvature), CG and LiSSA by budget, then grad_dot."""
    kinds = ("ekfac", "ekfac_mlp", "kfac", "", "cg", "lissa", "grad", "block")

    def kind(n: str) -> int:
        known = [i for i, k in enumerate(kinds) if k and n.startswith(k)]
        return max(known) if known else kinds.index("")

    return sorted(names, key=lambda n: (kind(n), len(n), n))


def markdown(payload: dict) -> str:
    """Our table with the paper's numbers beside it (docs/design.md §Yardsticks), after any
    `run_notes`
    (remarks on the run added to the JSON by hand, e.g. about timings)."""
    rows, paper = [], payload["paper"]
    for name in ordered(payload["methods"]):
        r = payload["methods"][name]
        kind, _, budget = name.partition("_")
        ref = name if name in paper["spearman"] else None
        if kind in ("cg", "lissa"):
            same = [int(k.partition("_")[2]) for k in payload["methods"] if k.startswith(kind)]
            ref = PAPER_ROW[f"{kind}_{'small' if int(budget) == min(same) else 'large'}"]
        rows.append({
            "method": name, "Spearman": common.format_mean_std(r, "spearman"),
            "Pearson": common.format_mean_std(r, "pearson"),
            "fit_s": r["fit_s"], "score_s": r["score_s"], "peak_MiB": r["peak_mem_mb"],
            "paper": f"{ref}: {paper['spearman'][ref]}" if ref else "—",
            "paper time": paper["time"].get(ref, "—") if ref else "—",
        })  # fmt: skip
        if "vs_block_exact" in r:
            block = common.format_mean_std(r["vs_block_exact"], "spearman")
            rows[-1]["Spearman vs block_exact"] = block
    s, g = payload["setup"], payload["ground_truth"]
    cols = ["method", "Spearman", "Pearson", "fit_s", "score_s", "peak_MiB", "paper", "paper time"]
    if any("vs_block_exact" in r for r in payload["methods"].values()):
        cols.insert(3, "Spearman vs block_exact")
    return (
        f"# Experiment 1: IHVP accuracy vs exact-GGN conjugate gradient\n\n"
        f"Model: {s['model']} ({s['n_params_tracked']:,} tracked parameters, float64). "
        f"{s['n_queries']} queries × {s['n_candidates']} candidates; G = exact GGN on "
        f"{s['n_fit_sequences']} documents ({s['n_fit_tokens']} tokens); "
        f"λ = {s['damping']:.3g} = {s['damping_rel_to_mean_eig']:.3g} × trace(G)/P "
        f"(λ_max(G) = {s['lambda_max']:.3g}, κ = {s['condition_number']:.3g}).\n\n"
        f"Ground truth: CG to tol {g['tol']:g}; iterations {min(g['iterations'])}–"
        f"{max(g['iterations'])}; worst relative residual {max(g['relative_residual']):.2e} "
        f"(all < {g['converged_below']:g}: {g['all_converged']}); {g['score_s']:.0f} s"
        + (f", stopped by its time budget of {g['time_limit_s']:.0f} s"
           if g.get("stopped_by_time") else "") + ".\n\n"
        + _stability_line(g.get("stability"))
        + "".join(f"Note: {n}\n\n" for n in payload.get("run_notes", []))
        + common.markdown_table(rows, cols, floatfmt=".3g")
        + f"\nSpearman/Pearson: mean ± std over queries, against the ground truth. fit_s: factor "
        "fitting; score_s: preconditioning the queries (all of an iterative solver's cost) + "
        "scoring the candidates. peak_MiB: resident-set growth during the method (memory an "
        "earlier method freed and this one reused reads as ~0). Paper (design notes): "
        f"{paper['setup']}; its CG/LiSSA rows are matched to ours by role (smaller/larger "
        "budget), not by iteration count.\n"
    )


def _stability_line(st: dict | None) -> str:
    """How settled the truth's ranking is (see `AccuracyRun.stability`), as a markdown paragraph."""
    if not st:
        return ""
    what = st.get("compared", "x before the last refinement round")
    res = st.get("residual_of_compared", st.get("residual_before_last_round", [float("nan")]))
    return (f"Truth's stability: its scores vs those of {what} (worst relative residual "
            f"{max(res):.1e}): Spearman {st['spearman_mean']:.4f} (per query "
            f"{', '.join(f'{x:.4f}' for x in st['spearman_per_query'])}).\n\n")


def plot(payload: dict, path: Path) -> None:
    """Spearman vs the ground truth per method (mean ± std over queries), paper's beside."""
    from matplotlib.figure import Figure

    names = ordered(payload["methods"])
    ours = [payload["methods"][n]["spearman_mean"] for n in names]
    err = [payload["methods"][n]["spearman_std"] for n in names]
    paper = [payload["paper"]["spearman"].get(n, float("nan")) for n in names]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.barh(names, ours, xerr=err, color="tab:blue", label="msif-lite")
    ax.plot(paper, names, "rD", label="paper (same method)")
    ax.set(xlabel="Spearman ρ vs exact-GGN CG", xlim=(min(0.0, *ours), 1.0))
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.15), ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load(args: argparse.Namespace):
    """(shipped pipeline, model label) for the run's --preset / --world / --checkpoints."""
    world, ckpt = args.world, args.checkpoints
    if world is None or ckpt is None:
        w, c = trained_pipeline(args.preset)
        world, ckpt = world or w, ckpt or c
    shipped = load_shipped(args.preset, world_dir=world, checkpoint_dir=ckpt)
    source = f"{args.preset} pipeline" if args.checkpoints is None else shipped.root.name
    return shipped, f"{shipped.finetuned_meta.preset} ({source}, pretrained θ_pt)"


def main(argv: Sequence[str] | None = None) -> common.BenchResult:
    """`msif-lite bench accuracy`: run, then write <out>/accuracy.json, .md and .png."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped, label = load(args)
    payload = run(shipped, args, label)
    result = common.finish("accuracy", payload, markdown(payload), args.out)
    plot(payload, result.json_path.with_suffix(".png"))
    return result


BENCH = common.Benchmark("accuracy", "Exp 1: each inverse-HVP approximation vs an exact-GGN "
                         "conjugate-gradient ground truth", main)  # fmt: skip

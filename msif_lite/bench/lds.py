"""Does influence predict retraining? `msif-lite bench lds` (notebook 10).

On the `lds` world (200 documents, 52 pre-training-only questions; one re-pre-train +
re-fine-tune ≈ 45 s on one CPU core):

1. retraining ground truth: M random half-corpus subsets, each re-pre-trained from the same
   initialisation and schedule and re-fine-tuned with the same data and α; m(q) = −log
   p(answer | prompt) and greedy correctness measured per question; the first K subsets
   again with a second data-order seed (the noise ceiling). Shipped as data/lds/<preset>.json
   (`GroundTruth`, refused for another world or tokenizer);
2. every registered method scores every document (no candidate pre-selection);
3. LDS per method (mean ± standard error over questions) beside the noise ceiling, and
   fact-tracing MRR over the whole corpus on the same model (the other question);
4. leave-top-k-out: for one question per entity, remove each question's top-k documents by
   a method (k = documents stating each fact) in one retrain, and measure the rise of m on
   those questions and on the others, beside the true sources, random documents (the
   `random` method) and no removal (another data-order seed).

Writes results/lds.{json,md,png}. MSIF_FAST=1: the `lds-fast` pipeline (a few steps per
stage), 4 subsets, 2 noise retrains, 3 removal methods — plumbing, not a result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import METHODS, Stage, available
from msif_lite.bench.common import Benchmark, BenchResult, finish, markdown_table
from msif_lite.config import fast_mode
from msif_lite.eval.metrics import lds, mean_reciprocal_rank, sem, spearman
from msif_lite.eval.retraining import (
    GroundTruth,
    RetrainConfig,
    measure,
    outcome,
    retrain,
    run_subsets,
    subset_masks,
)
from msif_lite.world.shipped import Shipped, data_dir, load_shipped, trained_pipeline


@dataclass(frozen=True)
class LDSBenchConfig:
    """What the benchmark retrains (the defaults are the committed run)."""

    retrain: RetrainConfig = RetrainConfig("lds", n_subsets=32, n_noise=8)
    removal_queries: int = 13  # questions about distinct entities removed in one retrain
    removal_methods: tuple[str, ...] | None = (
        "multi_stage", "single_stage", "finetune_only", "grad_dot", "grad_cosine",
        "multi_stage_cosine", "multi_stage_mlp", "multi_stage_alpha_inf", "bm25", "embedding",
        "bm25_question", "embedding_question", "random",
    )  # one retrain each; None: every scored method (the variants' removals: bench variants)
    methods: tuple[str, ...] | None = None  # None: every registered method


FAST = LDSBenchConfig(RetrainConfig("lds-fast", n_subsets=4, n_noise=2), removal_queries=4,
                      removal_methods=("multi_stage", "grad_dot", "bm25"))  # fmt: skip


def ground_truth(shipped: Shipped, cfg: RetrainConfig, path: Path, partial: Path) -> GroundTruth:
    """Load the shipped ground truth if it matches, else retrain (resumable) and save it."""
    world, tok = shipped.world, shipped.tokenizer
    if path.exists():
        gt = GroundTruth.load(path, world, tok)
        if gt.masks.shape[0] >= cfg.n_subsets and gt.m_noise.shape[0] >= cfg.n_noise and \
                gt.fingerprint["settings"] == _settings(cfg):  # fmt: skip
            return gt
    rows = run_subsets(world, tok, cfg, partial)
    main = [r for r in rows if r["seed"] == cfg.data_seed]
    noise = [r for r in rows if r["seed"] == cfg.noise_seed]
    gt = GroundTruth(
        [d.doc_id for d in world.documents], [q.fact_id for q in world.queries],
        subset_masks(len(world.documents), cfg.n_subsets, cfg.fraction, cfg.subset_seed),
        torch.tensor([r["m"] for r in main], dtype=torch.float64),
        torch.tensor([r["correct"] for r in main], dtype=torch.bool),
        torch.tensor([r["m"] for r in noise], dtype=torch.float64).reshape(-1, len(world.queries)),
        measure(shipped.finetuned, tok, world.queries),
        json.loads(partial.read_text().splitlines()[0])["fingerprint"],
        float(np.mean([r["s"] for r in rows])),
    )  # fmt: skip
    gt.save(path)
    return gt


def _settings(cfg: RetrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in ("n_subsets", "n_noise")}


def all_scores(att: Attributor, queries, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """(Q, N) scores of every document for every question, per method."""
    return {n: att.scores(n, queries, att.doc_ids).double() for n in names}


def noise_ceiling(gt: GroundTruth) -> tuple[float, float]:
    """Mean ± sem over questions of Spearman_j(m_seedB, m_seedA) on the re-seeded subsets."""
    k = gt.m_noise.shape[0]
    per_q = [spearman(gt.m_noise[:, q], gt.m[:k, q]) for q in range(gt.m.shape[1])]
    return float(np.mean(per_q)), sem(per_q)


def diagnostics(gt: GroundTruth, world, att: Attributor, scores: dict[str, torch.Tensor]) -> dict:
    """Why a method may miss: the LDS of the true-source indicator (score 1 for each
    document stating the fact), m by how many of a fact's sources a subset keeps (the
    nonlinearity no additive score captures), gradient norms of true sources vs the others
    at θ_pt, and how many true sources each method puts in a question's top-k."""
    col = {d: i for i, d in enumerate(gt.doc_ids)}
    src = [[col[d] for d in q.source_doc_ids] for q in world.queries]
    oracle = torch.zeros(len(src), len(col), dtype=torch.float64)
    for i, cols in enumerate(src):
        oracle[i, cols] = 1.0
    per_q = lds(oracle, gt.masks, gt.m)
    kept = torch.stack([gt.masks[:, c].sum(1) for c in src], 1)  # (M, Q)
    norms = att.candidate_norms(att.doc_ids, Stage.PRETRAINED)
    is_src = torch.zeros(len(col), dtype=torch.bool)
    is_src[[c for cols in src for c in cols]] = True
    k = world.config.docs_per_fact
    hits = {n: float(np.mean([len(set(s[i].argsort(descending=True)[:k].tolist()) & set(c)) / k
                              for i, c in enumerate(src)])) for n, s in scores.items()}
    return {
        "true_source_indicator_lds": {"mean": float(per_q.mean()), "sem": sem(per_q.tolist())},
        "m_by_sources_kept": {str(j): float(gt.m[kept == j].mean())
                              for j in range(int(kept.max()) + 1) if (kept == j).any()},
        "grad_norm_true_sources_median": float(norms[is_src].median()),
        "grad_norm_other_docs_median": float(norms[~is_src].median()),
        "true_sources_in_top_k": hits,
    }  # fmt: skip


def removal_targets(world, n: int) -> list[int]:
    """One question per entity (the first), at most n: indices into world.queries."""
    seen, out = set(), []
    for i, q in enumerate(world.queries):
        e = world.fact(q.fact_id).entity_id
        if e not in seen:
            seen.add(e)
            out.append(i)
    return out[:n]


def removal_sets(world, scores: dict[str, torch.Tensor], targets: list[int],
                 k: int) -> dict[str, list[str]]:  # fmt: skip
    """Per method the union over target questions of its top-k documents; plus the true
    sources and no removal."""
    ids = [d.doc_id for d in world.documents]
    out = {"none": [], "true_sources": sorted({d for i in targets
                                               for d in world.queries[i].source_doc_ids})}
    for name, s in scores.items():
        out[name] = sorted({ids[j] for i in targets for j in s[i].argsort(descending=True)[:k]})
    return out


def run_removals(shipped: Shipped, cfg: RetrainConfig, sets: dict[str, list[str]],
                 targets: list[int], partial: Path,
                 previous: dict[str, dict] | None = None) -> dict[str, dict]:  # fmt: skip
    """Retrain once per removal set (resumable); Δm on targets and on the other questions.

    A row of `previous` (an earlier run's `top_k_removal`, same world, targets and seeds)
    whose `removed` documents equal a set's is reused instead of retrained: the outcome of a
    retrain depends only on what was removed and the seeds."""
    old = {(tuple(r["removed"]), r["seed"]): r for r in (previous or {}).values()
           if "removed" in r}  # fmt: skip
    world, tok = shipped.world, shipped.tokenizer
    done = {}
    if partial.exists():
        done = {r["key"]: r for r in map(json.loads, partial.read_text().splitlines())}
    m0 = measure(shipped.finetuned, tok, world.queries)
    acc0 = torch.tensor(outcome(shipped.finetuned, tok, world.queries)["correct"]).double()
    others = [i for i in range(len(world.queries)) if i not in set(targets)]
    out = {}
    for name, removed in sets.items():
        seed = cfg.noise_seed if name == "none" else cfg.data_seed
        if (tuple(removed), seed) in old:
            out[name] = {**old[(tuple(removed), seed)], "reused": True}
            continue
        key = hashlib.sha256(json.dumps([removed, seed, _settings(cfg)]).encode()).hexdigest()
        if key not in done:
            t0 = time.perf_counter()
            gone = set(removed)
            model = retrain(world, tok, [d.doc_id not in gone for d in world.documents], cfg, seed)
            row = {"key": key, "name": name, **outcome(model, tok, world.queries),
                   "s": round(time.perf_counter() - t0, 1)}  # fmt: skip
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[key] = row
        dm = torch.tensor(done[key]["m"], dtype=torch.float64) - m0
        acc = torch.tensor(done[key]["correct"]).double()
        out[name] = {"dm_targets_mean": float(dm[targets].mean()),
                     "dm_others_mean": float(dm[others].mean()),
                     "acc_drop_targets": float((acc0 - acc)[targets].mean()),
                     "acc_drop_others": float((acc0 - acc)[others].mean()),
                     "n_removed": len(removed), "seed": seed, "removed": list(removed)}  # fmt: skip
    return out


def previous_removals(preset: str, n_targets: int, path: Path) -> dict[str, dict]:
    """The committed leave-top-k-out rows of `preset` (results/lds.json) with their removed
    documents, when they were for the same number of targets; else {}."""
    if not path.exists():
        return {}
    w = json.loads(path.read_text()).get("worlds", {}).get(preset, {})
    if w.get("settings", {}).get("removal_targets") != n_targets:
        return {}
    return {n: {k: v for k, v in r.items() if k != "reused"}
            for n, r in w.get("top_k_removal", {}).items()}  # fmt: skip


def run(cfg: LDSBenchConfig, cache: Path, gt_path: Path | None = None,
        previous: Path = Path("results") / "lds.json") -> dict:
    """Everything the benchmark measures for one world, as the JSON payload."""
    t0 = time.perf_counter()
    wdir, cdir = trained_pipeline(cfg.retrain.pipeline)
    shipped = load_shipped(world_dir=wdir, checkpoint_dir=cdir)
    world = shipped.world
    cache.mkdir(parents=True, exist_ok=True)
    path = gt_path or data_dir() / "lds" / f"{cfg.retrain.pipeline}.json"
    gt = ground_truth(shipped, cfg.retrain, path, cache / f"partial-{cfg.retrain.pipeline}.jsonl")
    gt_s = time.perf_counter() - t0
    att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer,
                     [(d.doc_id, d.text) for d in world.documents],
                     [(p.prompt, p.answer) for p in world.finetune_qa],
                     AttributionConfig(cache_dir=str(cache / "msif"), progress=False),
                     alpha=shipped.alpha, mentions=world.document_mentions())  # fmt: skip
    names = list(cfg.methods or available(att))  # TracIn's checkpoints: `bench variants`
    t1 = time.perf_counter()
    scores = all_scores(att, world.queries, names)
    score_s = time.perf_counter() - t1
    methods, truths = {}, [set(q.source_doc_ids) for q in world.queries]
    for n in names:
        per_q = lds(scores[n], gt.masks, gt.m)
        methods[n] = {"lds_mean": float(per_q.mean()), "lds_sem": sem(per_q.tolist()),
                      "mrr_all_docs": mean_reciprocal_rank(scores[n], att.doc_ids, truths)}
    targets = removal_targets(world, cfg.removal_queries)
    k = world.config.docs_per_fact
    rm_names = list(cfg.removal_methods or names)
    sets = removal_sets(world, {n: scores[n] for n in rm_names}, targets, k)
    removal = run_removals(shipped, cfg.retrain, sets, targets,
                           cache / f"removal-{cfg.retrain.pipeline}.jsonl",
                           previous_removals(world.preset, len(targets), previous))  # fmt: skip
    ceiling = noise_ceiling(gt)
    diag = diagnostics(gt, world, att, scores)
    return {"worlds": {world.preset: {
        "diagnostics": diag,
        "methods": methods, "noise_ceiling": {"mean": ceiling[0], "sem": ceiling[1]},
        "n_subsets": int(gt.masks.shape[0]), "n_noise": int(gt.m_noise.shape[0]),
        "n_queries": len(world.queries), "n_documents": len(world.documents),
        "retrain_s": gt.retrain_s, "top_k_removal": removal,
        "subset_accuracy_mean": float(gt.correct.double().mean()),
        "full_accuracy": float(torch.tensor(outcome(shipped.finetuned, shipped.tokenizer,
                                                    world.queries)["correct"]).double().mean()),
        "settings": {**asdict(cfg.retrain), "k": k, "removal_targets": len(targets),
                     "sign": "prediction_j = −Σ_{z∈S_j} I(z,q): positive I helps (lowers m)",
                     "text_query": "question + answer (bm25, embedding); *_question: question",
                     "skipped_methods": sorted(set(METHODS) - set(names)),
                     "ground_truth": str(path.relative_to(data_dir().parent))
                     if path.is_relative_to(data_dir().parent) else path.name,
                     "fast": fast_mode()},
        "timings_s": {"ground_truth": gt_s, "scores": score_s,
                      "total": time.perf_counter() - t0},
    }}}  # fmt: skip


def markdown(payload: dict) -> str:
    """results/lds.md: one table per world, the two questions side by side."""
    out = ["# Does influence predict retraining? (multi-stage LDS and leave-top-k-out)\n"]
    for name, w in payload["worlds"].items():
        rm = w["top_k_removal"]
        rows = [{"method": m, "LDS": f"{v['lds_mean']:.3f} ± {v['lds_sem']:.3f}",
                 "MRR (states the fact)": f"{v['mrr_all_docs']:.3f}",
                 "Δm targets": f"{rm[m]['dm_targets_mean']:.2f}" if m in rm else "",
                 "Δm others": f"{rm[m]['dm_others_mean']:.2f}" if m in rm else ""}
                for m, v in sorted(w["methods"].items(), key=lambda kv: -kv[1]["lds_mean"])]
        rows += [{"method": f"({m})", "Δm targets": f"{rm[m]['dm_targets_mean']:.2f}",
                  "Δm others": f"{rm[m]['dm_others_mean']:.2f}"}
                 for m in ("true_sources", "none")]  # fmt: skip
        nc = w["noise_ceiling"]
        out += [
            f"\n## World `{name}`: {w['n_documents']} documents, {w['n_queries']} questions, "
            f"{w['n_subsets']} subsets (half the corpus each), {w['n_noise']} re-seeded\n\n",
            f"Retraining noise ceiling (Spearman between two data-order seeds on the same "
            f"subsets): **{nc['mean']:.3f} ± {nc['sem']:.3f}**. Accuracy of the fine-tuned "
            f"model: {w['full_accuracy']:.3f} on the full corpus, "
            f"{w['subset_accuracy_mean']:.3f} on average after half-corpus retraining. One "
            f"retrain (both stages): {w['retrain_s']:.0f} s. LDS: mean ± standard error over "
            f"questions; Δm: rise of −log p(answer) in nats after removing each target "
            f"question's top-{w['settings']['k']} documents "
            f"({w['settings']['removal_targets']} targets, one per entity, in one retrain); "
            f"'(none)' is a retrain without removal under another data-order seed.\n\n",
            markdown_table(rows, ["method", "LDS", "MRR (states the fact)", "Δm targets",
                                  "Δm others"]),  # fmt: skip
            _diagnostics_md(w["diagnostics"], w["settings"]["k"]),
        ]
    return "".join(out)


def _diagnostics_md(d: dict, k: int) -> str:
    ts = d["true_source_indicator_lds"]
    m = ", ".join(f"{j}: {v:.2f}" for j, v in d["m_by_sources_kept"].items())
    hits = ", ".join(f"{n} {v:.2f}" for n, v in sorted(d["true_sources_in_top_k"].items(),
                                                        key=lambda kv: -kv[1]))  # fmt: skip
    return (f"\n### Diagnostics\n\n- LDS of the true-source indicator (score 1 for each "
            f"document that states the fact, 0 otherwise): {ts['mean']:.3f} ± {ts['sem']:.3f}.\n"
            f"- Mean m (nats) after retraining, by how many of the fact's sources the subset "
            f"keeps: {m}.\n- Median gradient norm ‖∇ℓ(z, θ_pt)‖: true sources "
            f"{d['grad_norm_true_sources_median']:.3g}, other documents "
            f"{d['grad_norm_other_docs_median']:.3g}.\n- Fraction of each question's top-{k} "
            f"that are its true sources: {hits}.\n")


def removal_bars(ax, removal: dict[str, dict], title: str) -> None:
    """Leave-top-k-out Δm per removal set on one axis: targets (red) over others (gray)."""
    rn = sorted(removal, key=lambda m: removal[m]["dm_targets_mean"])
    ax.barh(rn, [removal[m]["dm_targets_mean"] for m in rn], color="tab:red", label="targets")
    ax.barh(rn, [removal[m]["dm_others_mean"] for m in rn], color="tab:gray", alpha=0.7,
            label="other questions")  # fmt: skip
    ax.set(xlabel="rise of −log p(answer), nats", title=title)
    ax.legend(loc="lower right")


def lds_bars(ax, world: dict, title: str) -> None:
    """One world's LDS per method (mean ± s.e. over the questions) beside its noise ceiling."""
    names = sorted(world["methods"], key=lambda m: world["methods"][m]["lds_mean"])
    ax.barh(names, [world["methods"][m]["lds_mean"] for m in names],
            xerr=[world["methods"][m]["lds_sem"] for m in names], color="tab:blue")
    ax.axvline(world["noise_ceiling"]["mean"], ls="--", c="gray", label="noise ceiling")
    ax.axvline(0, c="black", lw=0.8)
    ax.set(xlabel="LDS (Spearman, mean ± s.e. over the questions)", title=title)
    ax.legend(loc="lower right")


def plot(payload: dict, path: Path) -> None:
    """Per world: LDS per method with the noise ceiling, and Δm of leave-top-k-out."""
    from matplotlib.figure import Figure

    worlds = payload["worlds"]
    fig = Figure(figsize=(11, 4.2 * len(worlds)))
    axes = fig.subplots(len(worlds), 2, squeeze=False)
    for (a, b), (wname, w) in zip(axes, worlds.items()):
        lds_bars(a, w, f"world {wname}: predicting retraining")
        if w.get("top_k_removal"):  # bench unrolled may run without removals
            removal_bars(b, w["top_k_removal"],
                         f"world {wname}: remove each method's top-k, retrain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merged(out_dir: Path, payload: dict) -> dict:
    """`payload`'s worlds added to those already in out_dir/lds.json (one entry per world)."""
    old = out_dir / "lds.json"
    worlds = json.loads(old.read_text()).get("worlds", {}) if old.exists() else {}
    return {**payload, "worlds": {**worlds, **payload["worlds"]}}


def main(argv: Sequence[str] | None = None) -> BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench lds", description=__doc__)
    ap.add_argument("--out", default="results", help="where lds.* go")
    ap.add_argument("--cache-dir", default=".cache/lds", help="partial retrains, factors")
    ap.add_argument("--ground-truth", help="ground-truth file (default data/lds/<preset>.json)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--pipeline", default=None,
                    help="world/pipeline preset: lds (default) or lds-hard; results of each "
                         "world are kept side by side in lds.json")  # fmt: skip
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = FAST if fast_mode() else LDSBenchConfig()
    if a.pipeline:
        cfg = replace(cfg, retrain=replace(cfg.retrain, pipeline=a.pipeline))
    gt_path = Path(a.ground_truth) if a.ground_truth else None
    if fast_mode() and gt_path is None:
        gt_path = Path(a.cache_dir) / "ground-truth-fast.json"
    payload = run(cfg, Path(a.cache_dir), gt_path, Path(a.out) / "lds.json")
    args = sys.argv[1:] if argv is None else list(argv)
    for w in payload["worlds"].values():
        w["settings"]["command"] = " ".join(["msif-lite bench lds", *args])
    payload = merged(Path(a.out), payload)
    result = finish("lds", payload, markdown(payload), a.out)
    plot(payload, result.json_path.with_suffix(".png"))
    return result


BENCH = Benchmark("lds", "does influence predict retraining? LDS of every method against "
                  "re-pre-train + re-fine-tune runs, leave-top-k-out", main)


"""Why influence misses the documents that cause the answer, and the variants that find
them: `msif-lite bench variants` (Notebook 11).

On the two counterfactual worlds of `bench lds` (their shipped retraining ground truth):

1. diagnosis — at θ_pt, the per-token loss and gradient norm of the true sources against
   the documents that outrank them; which tokens carry the multi-stage score (the entity's
   name, the answer, the other words; the share of the single largest token); redundancy
   (m after retraining by how many of a fact's sources the subset keeps);
2. variants — every method of `VARIANTS` (registry entries) and the `INGREDIENTS` (the
   token-level sums on the gradient dot product, to separate the curvature from the
   summation) scored on every document: LDS, fact-tracing MRR, seconds;
3. leave-top-k-out — each removal method's top-k documents for one question per entity
   removed in one retrain (both stages), beside the true sources, random documents and a
   retrain without removal under another data-order seed (the noise).

Writes results/variants.{json,md,png}. The retrains are resumable (`--cache-dir`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import Method, Stage, get_method
from msif_lite.attribution.variants import TokenMethod, TokenSum, decoded_token_spans
from msif_lite.bench.common import Benchmark, BenchResult, finish, markdown_table
from msif_lite.bench.lds import (
    diagnostics,
    previous_removals,
    removal_bars,
    removal_sets,
    removal_targets,
    run_removals,
)
from msif_lite.config import fast_mode
from msif_lite.engine.capture import capture_batch
from msif_lite.eval.metrics import lds, mean_reciprocal_rank, sem
from msif_lite.eval.retraining import GroundTruth, RetrainConfig, pretrain_checkpoints
from msif_lite.world.shipped import data_dir, load_shipped, trained_pipeline

VARIANTS = ("multi_stage", "grad_dot", "grad_cosine", "multi_stage_cosine",
            "multi_stage_relatif", "multi_stage_after_mention", "tracin",
            "multi_stage_token_unit", "multi_stage_token_positive", "bm25", "embedding",
            "random")  # fmt: skip
INGREDIENTS = (
    TokenMethod("grad_dot_token_unit", "Gradient dot, per-position unit gradients",
                "Σ_t I_t/‖Ds_t ā_tᵀ‖ without curvature", "grad_dot", TokenSum.UNIT),
    TokenMethod("grad_dot_token_positive", "Gradient dot, helpful positions (unit)",
                "Σ_t max(0, I_t/‖Ds_t ā_tᵀ‖) without curvature", "grad_dot",
                TokenSum.UNIT_POSITIVE),
)  # fmt: skip
GRADIENT_REMOVALS = ("multi_stage", "grad_dot", "grad_cosine", "multi_stage_relatif",
                     "multi_stage_after_mention", "tracin", "multi_stage_token_unit",
                     "multi_stage_token_positive")  # fmt: skip


@dataclass(frozen=True)
class VariantsConfig:
    """What the benchmark measures (the defaults are the committed run)."""

    pipelines: tuple[str, ...] = ("lds", "lds-hard")
    removal_methods: tuple[str, ...] = (*GRADIENT_REMOVALS, "bm25", "embedding", "random")
    hard_removal_methods: tuple[str, ...] = ("multi_stage", "multi_stage_token_unit",
                                             "multi_stage_token_positive", "tracin", "bm25",
                                             "random")  # fmt: skip
    removal_queries: int = 13  # one question per entity, removed together in one retrain
    checkpoint_every: int = 100  # TracIn: pre-training checkpoints every this many steps
    diagnosis_only: tuple[str, ...] = ("default",)  # worlds without retraining ground truth


# ---------------------------------------------------------------------------- diagnosis
@torch.no_grad()
def document_stats(att: Attributor, doc_ids: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per document at θ_pt: mean per-token loss ℓ(z)/T and the gradient norm ‖∇ℓ(z)‖."""
    model, losses = att.pretrained, []
    for i in range(0, len(doc_ids), att.config.batch_size):
        batch = att.collate(att.candidates(doc_ids[i : i + att.config.batch_size]))
        n_tok = batch.labels[:, 1:].ne(-100).sum(1).clamp_min(1)
        losses.append(att.task.loss(model, batch).double() / n_tok)
    return {"loss_per_token": torch.cat(losses),
            "grad_norm": att.candidate_norms(doc_ids, Stage.PRETRAINED)}  # fmt: skip


def token_roles(tokenizer, input_ids: Sequence[int], name: str, value: str) -> list[str]:
    """Role of the token each position predicts (x_{t+1}): 'name', 'answer' or 'other'."""
    text, spans = decoded_token_spans(tokenizer, input_ids)

    def hits(s: str) -> list[tuple[int, int]]:
        return [(k, k + len(s)) for k in range(len(text)) if text.startswith(s, k)]

    names, values = hits(name), hits(value)
    def over(a: int, b: int, sp: list[tuple[int, int]]) -> bool:
        return any(a < y and b > x for x, y in sp)

    return ["name" if over(a, b, names) else "answer" if over(a, b, values) else "other"
            for a, b in spans[1:] + [(len(text), len(text))]]  # fmt: skip


def token_shares(att: Attributor, world, method: str, top: dict[int, list[int]],
                 n_queries: int) -> dict:  # fmt: skip
    """Where the `method` score of the true sources and of the documents outranking them
    sits: per role the mean of Σ_{t ∈ role} I_t / Σ_t |I_t|, and the share of |I| on the
    single largest token."""
    m = get_method(method)
    queries = world.queries[:n_queries]
    pre = m.preconditioned(att, queries, att.settings)
    col = {d: i for i, d in enumerate(att.doc_ids)}
    out = {g: {"name": [], "answer": [], "other": [], "largest_token": []}
           for g in ("true_sources", "outranking")}  # fmt: skip
    for qi, q in enumerate(queries):
        fact = world.fact(q.fact_id)
        name = world.entity_name(fact.entity_id)
        src = [col[d] for d in q.source_doc_ids]
        pq = {k: v[qi : qi + 1] for k, v in pre.items()}
        for group, js in (("true_sources", src), ("outranking", [j for j in top[qi]
                                                                  if j not in src])):
            if not js:
                continue
            cands = att.candidates([att.doc_ids[j] for j in js])
            cap = capture_batch(att.pretrained, att.task, att.collate(cands), att.modules)
            terms = sum(x.token_scores(pq[mod.name])
                        for mod, x in zip(att.modules, cap.layers))[0].double()  # fmt: skip
            terms = terms.masked_fill(~cap.mask, 0.0)
            for b, c in enumerate(cands):
                roles = token_roles(att.tokenizer, c.input_ids, name, fact.value)
                row = terms[b, : len(roles)]
                total = row.abs().sum().clamp_min(1e-30)
                for role in ("name", "answer", "other"):
                    sel = torch.tensor([r == role for r in roles])
                    out[group][role].append(float(row[sel].sum() / total))
                out[group]["largest_token"].append(float(row.abs().max() / total))
    return {g: {k: float(np.mean(v)) for k, v in d.items()} for g, d in out.items()}


def source_groups(att: Attributor, world, ms_scores: torch.Tensor
                  ) -> tuple[dict[int, list[int]], dict[str, torch.Tensor]]:  # fmt: skip
    """Each question's multi-stage top-k (column indices), and (N,) masks of the true
    sources, the documents in some top-k that are not sources, and all documents."""
    k = world.config.docs_per_fact
    col = {d: i for i, d in enumerate(att.doc_ids)}
    src = [[col[d] for d in q.source_doc_ids] for q in world.queries]
    top = {i: ms_scores[i].argsort(descending=True)[:k].tolist() for i in range(len(src))}
    is_src = torch.zeros(len(col), dtype=torch.bool)
    is_src[[j for s in src for j in s]] = True
    outrank = torch.zeros(len(col), dtype=torch.bool)
    outrank[[j for i, t in top.items() for j in t if j not in src[i]]] = True
    return top, {"true_sources": is_src, "outranking": outrank & ~is_src,
                 "all_documents": torch.ones(len(col), dtype=torch.bool)}  # fmt: skip


def theta_pt_medians(att: Attributor, groups: dict[str, torch.Tensor]) -> dict:
    """Per group, the median per-token loss and gradient norm at θ_pt (`document_stats`)."""
    st = document_stats(att, att.doc_ids)
    return {g: {n: float(v[m].median()) for n, v in st.items()} for g, m in groups.items()}


def diagnose(att: Attributor, world, gt: GroundTruth, ms_scores: torch.Tensor) -> dict:
    """Loss, gradient norms and token shares of the true sources vs the documents the
    multi-stage score ranks above them; redundancy from the ground truth."""
    top, groups = source_groups(att, world, ms_scores)
    ent = {d.doc_id: {world.fact(f).entity_id for f in d.fact_ids} for d in world.documents}
    same = [world.fact(q.fact_id).entity_id in ent[att.doc_ids[j]]
            for i, q in enumerate(world.queries) for j in top[i]]  # fmt: skip
    return {
        "at_theta_pt": theta_pt_medians(att, groups),
        "token_shares_multi_stage": token_shares(att, world, "multi_stage", top,
                                                 min(20, len(world.queries))),  # fmt: skip
        "multi_stage_top_k_same_entity": float(np.mean(same)),
        **diagnostics(gt, world, att, {"multi_stage": ms_scores}),
    }


# ---------------------------------------------------------------------------- one world
def methods_for(names: Sequence[str]) -> list[Method]:
    return [get_method(n) for n in names] + list(INGREDIENTS)


def run_world(pipeline: str, cfg: VariantsConfig, cache: Path,
              lds_results: Path = Path("results") / "lds.json") -> dict:  # fmt: skip
    """Everything measured on one world (its shipped ground truth); removal sets already
    retrained by `bench lds` (its results file) are reused."""
    wdir, cdir = trained_pipeline(pipeline)
    shipped = load_shipped(world_dir=wdir, checkpoint_dir=cdir)
    world, tok = shipped.world, shipped.tokenizer
    gt = GroundTruth.load(data_dir() / "lds" / f"{pipeline}.json", world, tok)
    rcfg = RetrainConfig(pipeline, **{k: v for k, v in gt.fingerprint["settings"].items()
                                      if k in ("fraction", "subset_seed", "init_seed",
                                               "data_seed", "noise_seed")})  # fmt: skip
    t0 = time.perf_counter()
    ckpts = pretrain_checkpoints(world, tok, rcfg, cfg.checkpoint_every)
    ref = shipped.pretrained.state_dict()
    ckpt_drift = max(float((ckpts[-1].state[n] - ref[n]).abs().max()) for n in ref)
    ckpt_s = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    att = Attributor(shipped.pretrained, shipped.finetuned, tok,
                     [(d.doc_id, d.text) for d in world.documents],
                     [(p.prompt, p.answer) for p in world.finetune_qa],
                     AttributionConfig(cache_dir=str(cache / "msif"), progress=False),
                     alpha=shipped.alpha, checkpoints=ckpts,
                     mentions=world.document_mentions())  # fmt: skip
    truths = [set(q.source_doc_ids) for q in world.queries]
    scores, rows = {}, {}
    for m in methods_for(VARIANTS):
        t1 = time.perf_counter()
        scores[m.name] = att.scores(m, world.queries, att.doc_ids).double()
        per_q = lds(scores[m.name], gt.masks, gt.m)
        rows[m.name] = {"lds_mean": float(per_q.mean()), "lds_sem": sem(per_q.tolist()),
                        "mrr": mean_reciprocal_rank(scores[m.name], att.doc_ids, truths),
                        "score_s": round(time.perf_counter() - t1, 2)}  # fmt: skip
    rows["tracin"]["score_s"] += round(ckpt_s, 2)  # its pre-training re-run with checkpoints
    targets = removal_targets(world, cfg.removal_queries)
    k = world.config.docs_per_fact
    rm = cfg.removal_methods if pipeline == cfg.pipelines[0] else cfg.hard_removal_methods
    sets = removal_sets(world, {n: scores[n] for n in rm}, targets, k)
    removal = run_removals(shipped, rcfg, sets, targets, cache / f"removal-{pipeline}.jsonl",
                           previous_removals(pipeline, len(targets), lds_results))
    return {
        "top_k_removal": removal,
        "lds": {n: {"mean": r["lds_mean"], "sem": r["lds_sem"]} for n, r in rows.items()},
        "mrr": {n: r["mrr"] for n, r in rows.items()},
        "cost_s": {n: r["score_s"] for n, r in rows.items()},
        "diagnosis": diagnose(att, world, gt, scores["multi_stage"]),
        "goal": goal(removal, rows),
        "settings": {"pipeline": pipeline, "k": k, "removal_targets": len(targets),
                     "n_documents": len(world.documents), "n_queries": len(world.queries),
                     "n_subsets": int(gt.masks.shape[0]),
                     "tracin_checkpoints": [c.step for c in ckpts],
                     "tracin_final_checkpoint_max_abs_diff_from_theta_pt": ckpt_drift,
                     "ground_truth": f"data/lds/{pipeline}.json", "fast": fast_mode(),
                     **{k2: v for k2, v in asdict(cfg).items() if k2 == "checkpoint_every"}},
    }  # fmt: skip


def run_diagnosis_world(preset: str, cache: Path, n_queries: int = 48) -> dict:
    """A world without retraining ground truth (the shipped `default`): the diagnosis at
    θ_pt and fact-tracing MRR over the whole corpus of the registered variants for its first
    `n_queries` questions (TracIn left out: it needs the pre-training re-run with
    checkpoints; the per-position sums cost Q·N·T·P, hence the question subset)."""
    shipped = load_shipped(preset)
    world = replace(shipped.world, queries=shipped.world.queries[:n_queries])
    att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer,
                     [(d.doc_id, d.text) for d in world.documents],
                     [(p.prompt, p.answer) for p in world.finetune_qa],
                     AttributionConfig(cache_dir=str(cache / "msif"), progress=False),
                     alpha=shipped.alpha, mentions=world.document_mentions())  # fmt: skip
    truths = [set(q.source_doc_ids) for q in world.queries]
    mrr, cost, ms = {}, {}, None
    for m in [get_method(n) for n in VARIANTS if n != "tracin"]:
        t1 = time.perf_counter()
        s = att.scores(m, world.queries, att.doc_ids).double()
        cost[m.name] = round(time.perf_counter() - t1, 2)
        mrr[m.name] = mean_reciprocal_rank(s, att.doc_ids, truths)
        ms = s if m.name == "multi_stage" else ms
    top, groups = source_groups(att, world, ms)
    return {"mrr": mrr, "cost_s": cost, "settings": {"pipeline": preset,
            "k": world.config.docs_per_fact, "n_documents": len(world.documents),
            "n_queries": len(world.queries)},
            "diagnosis": {"at_theta_pt": theta_pt_medians(att, groups),
                          "token_shares_multi_stage": token_shares(att, world, "multi_stage",
                                                                   top, n_queries)}}  # fmt: skip


def goal(removal: dict, rows: dict) -> dict:
    """The issue's yardstick: the best gradient method's Δm on the targets as a fraction of
    the true sources', and its LDS and Δm against BM25's."""
    grads = [n for n in removal if n in GRADIENT_REMOVALS]
    best = max(grads, key=lambda n: removal[n]["dm_targets_mean"])
    ts, bm = removal["true_sources"]["dm_targets_mean"], removal.get("bm25", {})
    return {"best_gradient_method": best,
            "dm_fraction_of_true_sources": removal[best]["dm_targets_mean"] / ts,
            "lds_minus_bm25": rows[best]["lds_mean"] - rows["bm25"]["lds_mean"],
            "dm_minus_bm25": removal[best]["dm_targets_mean"] - bm.get("dm_targets_mean",
                                                                        float("nan"))}  # fmt: skip


# ---------------------------------------------------------------------------- report
def markdown(payload: dict) -> str:
    out = ["# Why influence misses the documents that cause the answer, and the variants\n"]
    for name, w in payload["worlds"].items():
        if "top_k_removal" not in w:
            out.append(_diagnosis_only_md(name, w))
            continue
        rm, s = w["top_k_removal"], w["settings"]
        rows = [{"method": n, "LDS": f"{v['mean']:.3f} ± {v['sem']:.3f}",
                 "MRR": f"{w['mrr'][n]:.3f}", "score s": f"{w['cost_s'][n]:.1f}",
                 "Δm targets": f"{rm[n]['dm_targets_mean']:.2f}" if n in rm else "",
                 "Δm others": f"{rm[n]['dm_others_mean']:.2f}" if n in rm else "",
                 "removed": rm[n]["n_removed"] if n in rm else ""}
                for n, v in sorted(w["lds"].items(), key=lambda kv: -kv[1]["mean"])]
        rows += [{"method": f"({n})", "Δm targets": f"{rm[n]['dm_targets_mean']:.2f}",
                  "Δm others": f"{rm[n]['dm_others_mean']:.2f}", "removed": rm[n]["n_removed"]}
                 for n in ("true_sources", "none")]  # fmt: skip
        d, g = w["diagnosis"], w["goal"]
        at = d["at_theta_pt"]
        ts = d["token_shares_multi_stage"]
        out += [
            f"\n## World `{name}` ({s['n_documents']} documents, {s['n_queries']} questions, "
            f"{s['n_subsets']} retrained subsets)\n\n",
            f"Δm: rise of −log p(answer) (nats) on the {s['removal_targets']} target "
            f"questions (one per entity) and on the others after removing each target's "
            f"top-{s['k']} documents and retraining both stages; '(none)' retrains without "
            "removal under another data-order seed (the noise).\n\n",
            markdown_table(rows, ["method", "LDS", "MRR", "Δm targets", "Δm others",
                                  "removed", "score s"]),  # fmt: skip
            "\n### Diagnosis\n\n",
            "- Median at θ_pt (per-token loss, ‖∇ℓ(z)‖): " + "; ".join(
                f"{grp} {v['loss_per_token']:.3f}, {v['grad_norm']:.1f}"
                for grp, v in at.items()) + ".\n",
            "- Where the multi-stage score sits (Σ_role I_t / Σ|I_t|, mean over documents): "
            + "; ".join(f"{grp}: name {v['name']:.2f}, answer {v['answer']:.2f}, other "
                        f"{v['other']:.2f}, largest single token {v['largest_token']:.2f} of |I|"
                        for grp, v in ts.items()) + ".\n",
            f"- Multi-stage top-{s['k']} documents about the question's entity: "
            f"{d['multi_stage_top_k_same_entity']:.2f}; true sources among them: "
            f"{d['true_sources_in_top_k']['multi_stage']:.2f}.\n",
            "- Redundancy, mean m after retraining by sources kept: " + ", ".join(
                f"{j}: {v:.2f}" for j, v in d["m_by_sources_kept"].items()) + "; LDS of the "
            f"true-source indicator {d['true_source_indicator_lds']['mean']:.3f}.\n",
            f"- Goal: best gradient method by Δm `{g['best_gradient_method']}`, "
            f"{100 * g['dm_fraction_of_true_sources']:.0f}% of the true sources' Δm; LDS − "
            f"BM25 {g['lds_minus_bm25']:+.3f}; Δm − BM25 {g['dm_minus_bm25']:+.2f}.\n",
        ]
    return "".join(out)


def _diagnosis_only_md(name: str, w: dict) -> str:
    s, d = w["settings"], w["diagnosis"]
    rows = [{"method": n, "MRR": f"{v:.3f}", "score s": f"{w['cost_s'][n]:.1f}"}
            for n, v in sorted(w["mrr"].items(), key=lambda kv: -kv[1])]
    return (f"\n## World `{name}` ({s['n_documents']} documents, {s['n_queries']} questions; "
            "no retraining ground truth: diagnosis and fact tracing only)\n\n"
            + markdown_table(rows, ["method", "MRR", "score s"]) + "\n- Median at θ_pt "
            "(per-token loss, ‖∇ℓ(z)‖): " + "; ".join(
                f"{g} {v['loss_per_token']:.3f}, {v['grad_norm']:.1f}"
                for g, v in d["at_theta_pt"].items()) + ".\n- Where the multi-stage score "
            "sits: " + "; ".join(
                f"{g}: name {v['name']:.2f}, answer {v['answer']:.2f}, other {v['other']:.2f}, "
                f"largest single position {v['largest_token']:.2f}"
                for g, v in d["token_shares_multi_stage"].items()) + ".\n")


def plot(payload: dict, path: Path) -> None:
    """Per world: LDS and leave-top-k-out Δm per method."""
    from matplotlib.figure import Figure

    worlds = {k: w for k, w in payload["worlds"].items() if "top_k_removal" in w}
    fig = Figure(figsize=(12, 4.5 * len(worlds)))
    axes = fig.subplots(len(worlds), 2, squeeze=False)
    for (a, b), (wname, w) in zip(axes, worlds.items()):
        names = sorted(w["lds"], key=lambda n: w["lds"][n]["mean"])
        a.barh(names, [w["lds"][n]["mean"] for n in names],
               xerr=[w["lds"][n]["sem"] for n in names], color="tab:blue")
        a.axvline(0, c="black", lw=0.8)
        a.set(xlabel="LDS (mean ± sem over questions)", title=f"{wname}: predicting retraining")
        removal_bars(b, w["top_k_removal"], f"{wname}: remove top-k, retrain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench variants", description=__doc__)
    ap.add_argument("--out", default="results", help="where variants.* go")
    ap.add_argument("--cache-dir", default=".cache/variants", help="retrains, factors")
    ap.add_argument("--pipeline", action="append",
                    help="only this world (repeatable); results of other worlds already in "
                         "variants.json are kept")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = VariantsConfig()
    worlds = {p: run_diagnosis_world(p, Path(a.cache_dir)) if p in cfg.diagnosis_only
              else run_world(p, cfg, Path(a.cache_dir), Path(a.out) / "lds.json")
              for p in (a.pipeline or (*cfg.pipelines, *cfg.diagnosis_only))}  # fmt: skip
    args = sys.argv[1:] if argv is None else list(argv)
    for w in worlds.values():
        w["settings"]["command"] = " ".join(["msif-lite bench variants", *args])
    old = Path(a.out) / "variants.json"
    if old.exists():
        worlds = {**json.loads(old.read_text()).get("worlds", {}), **worlds}
    first = worlds.get(cfg.pipelines[0]) or next(w for w in worlds.values()
                                                  if "top_k_removal" in w)
    payload = {**{k: first[k] for k in ("top_k_removal", "lds", "mrr", "settings")},
               "worlds": dict(sorted(worlds.items()))}  # fmt: skip
    result = finish("variants", payload, markdown(payload), a.out)
    plot(payload, result.json_path.with_suffix(".png"))
    return result


BENCH = Benchmark("variants", "why influence misses on the kit's LM and what does better "
                  "(LDS, MRR, leave-top-k-out of every variant)", main)

"""Experiment 2 of arXiv 2505.05017, fact tracing, on the kit's world (docs/design.md §Yardsticks).

`msif-lite bench fact-tracing`: queries about
pre-training-only facts, each ranked against BM25(question + answer) top-k ∪ true sources ∪
random documents ∪ documents sharing the answer; MRR and Recall@10 per method, mean ± std
over seeded draws; multi-stage sweeps over λ_pt, α and layers; the same multi-stage run on
embedding-retrieved candidates (no oracle). Writes results/fact_tracing.{json,md,*.png}.

Efficiency: every query of every draw is preconditioned at once per setting; candidate
gradients at θ_pt are computed once for the union of all candidate sets (GradientStore,
bfloat16 on disk under the cache and in memory) and serve every registered gradient
method and every multi-stage sweep point (the methods come from the registry,
`attribution.methods.METHODS`; a new method appears here without editing this file);
per-layer scores are kept, so the MLP-only score is the MLP part of the all-layer score
(exact: EK-FAC is block-diagonal per layer; checked against a real include="mlp"
Attributor). The multi-stage sweeps apply the EK-FAC
factors in float64 (λ_pt = 1e-8 is singular in float32). MSIF_FAST=1 shrinks everything.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from msif_lite.attribution import scoring
from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import (
    METHODS,
    GradientMethod,
    ScoreSettings,
    Stage,
    get_method,
    gradient_methods,
)
from msif_lite.bench.common import Benchmark, BenchResult, Timer, display_path, finish
from msif_lite.bench.fact_tracing_report import markdown, plots
from msif_lite.config import fast_mode
from msif_lite.engine.capture import per_sequence_grads
from msif_lite.engine.gradstore import GradientStore
from msif_lite.engine.ihvp import Damping
from msif_lite.eval import fact_tracing as ft
from msif_lite.eval.metrics import spearman
from msif_lite.world.lm import greedy_answers
from msif_lite.world.shipped import Shipped, load_shipped


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the benchmark (the paper's protocol by default) and its sweeps."""

    pools: ft.PoolConfig = ft.PoolConfig()
    dampings: tuple[float | None, ...] = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, None)
    alpha_factors: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)  # × the trained α
    n_check: int = 5  # queries of the bf16-vs-fp32 and MLP-only checks


FAST = BenchConfig(ft.PoolConfig(n_queries=6, n_draws=3, bm25_k=20, n_random=30, n_answer=15,
                                 embedding_k=40),
                   dampings=(1e-3, None), alpha_factors=(1.0, 10.0), n_check=2)  # fmt: skip
GRAD_DTYPE = torch.bfloat16


class CandidateGrads:
    """All candidates' gradients of one model, stacked per layer in memory (GRAD_DTYPE)."""

    def __init__(self, store: GradientStore, cands, chunk: int = 64):
        parts: dict[str, list[torch.Tensor]] = {m.name: [] for m in store.modules}
        for i in range(0, len(cands), chunk):
            for k, v in store.grads(cands[i : i + chunk]).items():
                parts[k].append(v.reshape(v.shape[0], -1))
        self.g = {k: torch.cat(v) for k, v in parts.items()}
        self.names = [m.name for m in store.modules]

    def scores(self, pre, chunk: int = 128) -> torch.Tensor:
        """(Q, N, L) float64 per-layer scores Σ ⟨P_l, DW_l⟩ (candidates upcast to float32)."""
        n = next(iter(self.g.values())).shape[0]
        q = next(iter(pre.values())).shape[0]
        out = torch.empty(q, n, len(self.names), dtype=torch.float64)
        for li, name in enumerate(self.names):
            p = pre[name].reshape(q, -1).float()
            for i in range(0, n, chunk):
                out[:, i : i + chunk, li] = (p @ self.g[name][i : i + chunk].float().T).double()
        return out

    def norms(self) -> torch.Tensor:
        return sum(v.double().pow(2).sum(1) for v in self.g.values()).sqrt()


@dataclass
class Scored:
    """What one run computed: the queries, the candidate union and every score array."""

    att: Attributor
    qs: list
    union: list[str]
    scores: dict[str, np.ndarray]  # method / sweep key → (Q, N) or (Q, N, L)
    timings: dict[str, float]


def gradient_scores(att: Attributor, qs, union: list[str], settings: ScoreSettings,
                    timings: dict) -> dict[str, np.ndarray]:  # fmt: skip
    """Every registered gradient method's (Q, N, L) per-layer scores (`scoring.finish`:
    normalised and masked, the score is their sum). One in-memory copy of each stage's
    candidate gradients serves every method taken at that stage."""
    cands, out = att.candidates(union), {}
    for stage in (Stage.FINETUNED, Stage.PRETRAINED):  # θ_ft first, then freed
        names = [n for n in gradient_methods()
                 if METHODS[n].candidates_at is stage and METHODS[n].dense_dot]
        with Timer() as t:
            grads = CandidateGrads(att.store(stage, GRAD_DTYPE), cands)
            for name in names:
                m: GradientMethod = METHODS[name]
                raw = grads.scores(m.preconditioned(att, qs, settings))
                out[name] = scoring.finish(m, att, qs, union, settings, raw,
                                           candidate_norms=grads.norms()).numpy()
        timings[f"{stage.value}_candidates_s"] = t.seconds
        if stage is Stage.PRETRAINED:
            out["_grads"] = grads  # kept for the sweeps
    return out


def sweep_scores(att: Attributor, qs, grads: CandidateGrads, cfg: BenchConfig) -> dict:
    """Multi-stage per-layer scores for every λ_pt (at the trained α) and every α factor,
    with the inverses applied in float64 (λ_pt = 1e-8 is singular in float32)."""
    ms, base, out = get_method("multi_stage"), replace(att.settings, float64=True), {}
    for lam in cfg.dampings:
        s = replace(base, pretrain_damping=Damping(absolute=lam))
        out[("damping", lam)] = grads.scores(ms.preconditioned(att, qs, s)).numpy()
    for f in cfg.alpha_factors:
        s = replace(base, alpha=f * att.alpha)
        out[("alpha", f)] = grads.scores(ms.preconditioned(att, qs, s)).numpy()
    return out


def score_everything(shipped: Shipped, draws: list[dict], cfg: BenchConfig, att: Attributor):
    """Scores of every registered method and every sweep point on the union of candidates."""
    world, timings = shipped.world, {}
    used = sorted({j for d in draws for j in d["queries"]})
    qs = [world.queries[j] for j in used]
    union = sorted({c for d in draws for cs in d["cands"] + d["emb"] for c in cs})
    scores: dict = {}
    with Timer() as t:
        for name, m in METHODS.items():
            dense = isinstance(m, GradientMethod) and m.dense_dot  # scored below, shared grads
            if not dense and m.requires() <= att.provides:
                scores[name] = att.scores(name, qs, union).numpy()
    timings["text_and_random_s"] = t.seconds
    grad = gradient_scores(att, qs, union, att.settings, timings)
    grads = grad.pop("_grads")
    scores |= {n: v.sum(-1) for n, v in grad.items()}
    scores["multi_stage_layers"] = grad["multi_stage"]
    with Timer() as t:
        scores |= sweep_scores(att, qs, grads, cfg)
    timings["multi_stage_sweeps_s"] = t.seconds
    return Scored(att, qs, union, scores, timings), used, grads


def metrics_of(sc: Scored, draws, truth, row, col, seed: int, pool: str = "cands",
               keep: dict | None = None) -> dict[str, dict]:  # fmt: skip
    """MRR / Recall@10 (mean ± std over draws) of every score array in `sc.scores`."""
    out = {}
    for key, s in sc.scores.items():
        s = s if s.ndim == 2 else s.sum(-1)
        per_draw = []
        for i, d in enumerate(draws):
            rng = np.random.default_rng([seed, i, 7])
            mrr, rec, rrs, firsts = ft.evaluate(s, col, d[pool], [truth[j] for j in d["queries"]],
                                                [row[j] for j in d["queries"]], rng)  # fmt: skip
            per_draw.append((mrr, rec))
            if keep is not None and isinstance(key, str):
                for j, rr in zip(d["queries"], rrs):
                    keep.setdefault("rr", {}).setdefault(key, {}).setdefault(j, []).append(rr)
                keep.setdefault("top1", {}).setdefault(key, []).extend(zip(d["queries"], firsts))
        out[key] = ft.summarize(per_draw)
    return out


def run(shipped: Shipped, cfg: BenchConfig, cache_dir: str = AttributionConfig.cache_dir,
        progress: bool = False) -> dict:  # fmt: skip
    """Everything the benchmark measures, as the JSON payload (no files written)."""
    t_start, world = time.perf_counter(), shipped.world
    att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer,
                     [(d.doc_id, d.text) for d in world.documents],
                     [(p.prompt, p.answer) for p in world.finetune_qa],
                     AttributionConfig(cache_dir=cache_dir, progress=progress),
                     alpha=shipped.alpha)  # fmt: skip
    with Timer() as t:
        draws = ft.build_draws(att, world, cfg.pools)
    sc, used, grads = score_everything(shipped, draws, cfg, att)
    sc.timings["retrieval_s"] = t.seconds
    row = {j: r for r, j in enumerate(used)}
    col = {d: i for i, d in enumerate(sc.union)}
    truth = {j: set(world.queries[j].source_doc_ids) for j in used}
    keep: dict = {}
    res = metrics_of(sc, draws, truth, row, col, cfg.pools.seed, keep=keep)
    emb_c = metrics_of(Scored(att, sc.qs, sc.union, {m: sc.scores[m] for m in METHODS
                                                     if m in sc.scores}, {}),
                       draws, truth, row, col, cfg.pools.seed, pool="emb")  # fmt: skip
    checks = run_checks(att, sc, grads, cfg, [col[d] for d in check_docs(sc, cfg)])
    payload = report_payload(shipped, cfg, sc, draws, res, emb_c, keep, row, col, truth, used)
    payload["checks"] = checks
    payload["setup"]["timings_s"] = {**sc.timings, "total_s": time.perf_counter() - t_start}
    return payload


def check_docs(sc: Scored, cfg: BenchConfig) -> list[str]:
    ck_q = range(min(cfg.n_check, len(sc.qs)))
    return sorted({d for j in ck_q for d in sc.qs[j].source_doc_ids} | set(sc.union[:48]))


def report_payload(shipped, cfg, sc: Scored, draws, res, emb_c, keep, row, col, truth,
                   used) -> dict:  # fmt: skip
    """The JSON payload: per-method metrics, sweeps, layer shares, analysis and setup."""
    world, att, alpha = shipped.world, sc.att, shipped.alpha
    lay = sc.scores["multi_stage_layers"]
    mlp_l = [i for i, m in enumerate(att.modules) if m.group == "mlp"]
    attn_l = [i for i, m in enumerate(att.modules) if m.group == "attention"]
    true_mask = np.zeros(lay.shape[:2], dtype=bool)
    for j in used:
        true_mask[row[j], [col[d] for d in truth[j] if d in col]] = True
    answered = greedy_answers(att.finetuned, att.tokenizer, [q.prompt for q in sc.qs])
    correct = {j: a.strip() == world.queries[j].answer for j, a in zip(used, answered)}
    full = {m: sc.scores[m] for m in keep["rr"]}
    analysis = ft.analysis(world, keep["rr"], keep["top1"], correct, full, row, sc.union)
    n_c = [len(c) for d in draws for c in d["cands"]]
    emb_recall = [len(truth[j] & set(e)) / len(truth[j])
                  for d in draws for j, e in zip(d["queries"], d["emb"])]  # fmt: skip
    n_params = sum(m.numel for m in att.modules)
    setup = {
        **asdict(cfg), "fast": fast_mode(), "alpha_trained": alpha,
        "model": shipped.finetuned_meta.preset, "checkpoints": display_path(shipped.root),
        "world_preset": world.preset, "n_documents": len(world.documents),
        "n_queries_available": len(world.queries),
        "n_queries_per_draw": len(draws[0]["queries"]), "n_queries_scored": len(used),
        "mean_candidates_per_query": float(np.mean(n_c)), "n_union_candidates": len(sc.union),
        "tracked_params": n_params, "candidate_grad_dtype": str(GRAD_DTYPE),
        "candidate_retrieval_query": "question + answer (BM25 top-k and embedding top-k)",
        "text_method_query": {n: METHODS[n].query.value for n in METHODS
                              if hasattr(METHODS[n], "query")},
        "mrr_std": "sample std (ddof=1) over draws", "ties": "broken by a seeded random order",
        "heuristic_lambda_pt": att.inverse(Stage.PRETRAINED, Damping()).damping_values,
        "alpha_in_scores": True, "multi_stage_sweep_dtype": "float64",
    }  # fmt: skip
    return {
        "methods": {m: res[m] for m in METHODS if m in res},
        "damping_sweep": {("heuristic" if lam is None else f"{lam:g}"): res[("damping", lam)]
                          for lam in cfg.dampings},  # fmt: skip
        "alpha_sweep": {f"{f:g}": {**res[("alpha", f)], "alpha": f * alpha}
                        for f in cfg.alpha_factors},  # fmt: skip
        "layers": {"all": res["multi_stage_layers"], "mlp": res["multi_stage_mlp"],
                   "mlp_share": {**ft.mlp_shares(lay[..., mlp_l].sum(-1), lay[..., attn_l].sum(-1),
                                                 true_mask),
                                 "definition": ft.MLP_SHARE_DEFINITION}},  # fmt: skip
        "embedding_candidates": {**emb_c, "candidate_recall": float(np.mean(emb_recall))},
        "analysis": analysis,
        "setup": setup,
    }


def run_checks(att: Attributor, sc: Scored, grads: CandidateGrads, cfg: BenchConfig,
               ck_n: list[int]) -> dict:  # fmt: skip
    """bf16 vs float32 candidate gradients (heuristic and smallest λ_pt), and the MLP part of
    the all-layer score vs a real include='mlp' Attributor."""
    q = min(cfg.n_check, len(sc.qs))
    qs, cands = sc.qs[:q], att.candidates([sc.union[i] for i in ck_n])
    g32 = [per_sequence_grads(att.pretrained, att.task, att.collate(cands[i:i + 16]), att.modules)
           for i in range(0, len(cands), 16)]  # fmt: skip
    g32 = {m.name: torch.cat([g[m.name] for g in g32]).double() for m in att.modules}
    ms, out = get_method("multi_stage"), {}
    lam_min = min((x for x in cfg.dampings if x is not None), default=None)
    for lam in {None, lam_min}:
        s = replace(att.settings, pretrain_damping=Damping(absolute=lam), float64=True)
        pre = ms.preconditioned(att, qs, s)
        layers32 = torch.stack([torch.einsum("qoi,noi->qn", pre[m.name].double(), g32[m.name])
                                for m in att.modules], -1)  # fmt: skip
        s32 = layers32.sum(-1)
        if lam is None:  # the MLP part with float32 candidate gradients
            part = (layers32 * get_method("multi_stage_mlp").layer_mask(att)).sum(-1)
        s16 = torch.from_numpy(sc.scores[("damping", lam)][:q][:, ck_n].sum(-1))
        tag = "heuristic" if lam is None else f"{lam:g}"
        out[f"bf16_vs_fp32_spearman_min[{tag}]"] = min(spearman(s16[i], s32[i]) for i in range(q))
        out[f"bf16_vs_fp32_max_rel_err[{tag}]"] = float((s16 - s32).abs().max()
                                                        / s32.abs().max())  # fmt: skip
    mlp_cfg = replace(att.config, factors=replace(att.config.factors, include="mlp"))
    mlp_att = Attributor(att.pretrained, att.finetuned, att.tokenizer, list(att.texts.items()),
                         att.finetune_pairs, mlp_cfg, alpha=att.alpha)  # fmt: skip
    real = mlp_att.scores("multi_stage", qs, [c.doc_id for c in cands])
    return out | {
        "mlp_only_vs_mlp_part_spearman_min": min(spearman(real[i], part[i]) for i in range(q)),
        "mlp_only_vs_mlp_part_max_rel_err": float((real - part).abs().max() / real.abs().max()),
        "n_queries": q, "n_candidates": len(cands),
    }


def main(argv: Sequence[str] | None = None) -> BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench fact-tracing", description=__doc__)
    ap.add_argument("--preset", default="default", help="shipped world/checkpoints")
    ap.add_argument("--world", help="world directory (default data/world/<preset>)")
    ap.add_argument("--checkpoints", help="directory with pretrained/ and finetuned/")
    ap.add_argument("--cache-dir", default=AttributionConfig.cache_dir,
                    help="factor/gradient cache")
    ap.add_argument("--out", default="results", help="where fact_tracing.* go")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a busy 2-core machine, two "
                         "threads spin-wait and run several times slower)")  # fmt: skip
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    shipped = load_shipped(a.preset, world_dir=a.world, checkpoint_dir=a.checkpoints)
    cfg = FAST if fast_mode() else BenchConfig()
    payload = run(shipped, cfg, a.cache_dir, a.progress)
    payload["setup"]["threads"] = a.threads
    args = sys.argv[1:] if argv is None else list(argv)
    payload["setup"]["command"] = " ".join(["msif-lite bench fact-tracing", *args])
    result = finish("fact_tracing", payload, markdown(payload), a.out)
    plots(payload, a.out)
    return result


BENCH = Benchmark("fact-tracing", "Exp 2: MRR and Recall@10 of every registered method, "
                  "damping and α sweeps, MLP vs attention", main)

"""Experiment 2 of arXiv 2505.05017, fact tracing, on the kit's world (DESIGN.md §3).

`msif-lite bench fact-tracing` (or `python benchmarks/fact_tracing.py`): queries about
pre-training-only facts, each ranked against BM25(question + answer) top-k ∪ true sources ∪
random documents ∪ documents sharing the answer; MRR and Recall@10 per method, mean ± std
over seeded draws; multi-stage sweeps over λ_pt, α and layers; the same multi-stage run on
embedding-retrieved candidates (no oracle). Writes results/fact_tracing.{json,md,*.png}.

Efficiency: every query of every draw is preconditioned at once per setting; candidate
gradients at θ_pt are computed once for the union of all candidate sets (GradientStore,
bfloat16 on disk under the cache and in memory) and serve grad_dot, grad_cosine,
single_stage and every multi-stage sweep point; per-layer scores are kept, so the MLP-only
score is the MLP part of the all-layer score (exact: EK-FAC is block-diagonal per layer;
checked against a real include="mlp" Attributor). The multi-stage sweeps apply the EK-FAC
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

from msif_lite.attribution import AttributionConfig, Attributor
from msif_lite.bench import tracing_metrics as tm
from msif_lite.bench.common import Timer, display_path, spearman, write_results
from msif_lite.capture import per_sequence_grads
from msif_lite.config import fast_mode
from msif_lite.factors import EigenFactors, EKFACFactors
from msif_lite.gradstore import GradientStore
from msif_lite.ihvp import EKFACIHVP, Damping
from msif_lite.lm import greedy_answers
from msif_lite.modules import Grads
from msif_lite.retrieval import embed_texts
from msif_lite.scores import precondition
from msif_lite.shipped import Shipped, load_shipped


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the benchmark (the paper's protocol by default)."""

    n_queries: int = 200  # per draw (all queries if fewer exist)
    n_draws: int = 3
    bm25_k: int = 100
    n_random: int = 200
    n_answer: int = 100  # documents sharing the answer string
    embedding_k: int = 500  # candidates of the embedding-retrieval run
    dampings: tuple[float | None, ...] = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, None)
    alpha_factors: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)  # × the trained α
    n_check: int = 5  # queries of the bf16-vs-fp32 and MLP-only checks
    seed: int = 0


FAST = BenchConfig(n_queries=6, n_draws=3, bm25_k=20, n_random=30, n_answer=15, embedding_k=40,
                   dampings=(1e-3, None), alpha_factors=(1.0, 10.0), n_check=2)  # fmt: skip
GRAD_DTYPE = torch.bfloat16


def qa_text(q) -> str:
    """'<question> <answer>' without the QA scaffolding (what BM25/embedding retrieve with)."""
    return f"{q.prompt} {q.answer}".replace("Question:", "").replace("\nAnswer:", "").strip()


class CandidateGrads:
    """All candidates' gradients of one model, stacked per layer in memory (GRAD_DTYPE)."""

    def __init__(self, store: GradientStore, cands, chunk: int = 64):
        parts: dict[str, list[torch.Tensor]] = {m.name: [] for m in store.modules}
        for i in range(0, len(cands), chunk):
            for k, v in store.grads(cands[i : i + chunk]).items():
                parts[k].append(v.reshape(v.shape[0], -1))
        self.g = {k: torch.cat(v) for k, v in parts.items()}
        self.names = [m.name for m in store.modules]

    def scores(self, pre: Grads, chunk: int = 128) -> torch.Tensor:
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


def as_float64(factors: EKFACFactors) -> EKFACFactors:
    """The same EK-FAC factors in float64, so that tiny λ_pt (1e-8) stays invertible."""
    return replace(factors, layers=tuple(
        EigenFactors(x.name, x.q_a.double(), x.eig_a.double(), x.q_s.double(), x.eig_s.double(),
                     x.lam.double()) for x in factors.layers))  # fmt: skip


def multistage_pre(ft: EKFACFactors, pt: EKFACFactors, qg: Grads, alphas: Sequence[float],
                   dampings: Sequence[float | None]):  # fmt: skip
    """Yield (α, λ, P = α (H_pt + λI)⁻¹ (H_ft + αI)⁻¹ ∇m) for every α and every λ (the same
    composition as MultiStageIHVP with include_alpha; the fine-tuning stage is shared)."""
    for a in alphas:
        ftp = precondition(qg, EKFACIHVP(ft, Damping(absolute=a)))
        for lam in dampings:
            out = precondition(ftp, EKFACIHVP(pt, Damping(absolute=lam)))
            yield a, lam, {k: v * a for k, v in out.items()}


def build_draws(att: Attributor, world, cfg: BenchConfig) -> list[dict]:
    """Seeded query draws with the paper's candidate pools and embedding candidates."""
    queries, ids = world.queries, att.doc_ids
    n = min(cfg.n_queries, len(queries))
    texts = [qa_text(q) for q in queries]
    answers = {q.answer for q in queries}
    share = {a: [d for d in ids if tm.contains_phrase(att.texts[d], a)] for a in answers}
    bm25 = [[d for d, _ in hits] for hits in att.bm25_index.search_many(texts, cfg.bm25_k)]
    emb = [[d for d, _ in h] for h in att.embedding_index.search(texts, cfg.embedding_k)]
    draws = []
    for i in range(cfg.n_draws):
        rng = np.random.default_rng([cfg.seed, i])
        qs = sorted(int(j) for j in rng.choice(len(queries), n, replace=False))
        cands = [tm.draw_candidates(queries[j].source_doc_ids, bm25[j], ids,
                                    share[queries[j].answer], rng, cfg.n_random, cfg.n_answer)
                 for j in qs]  # fmt: skip
        draws.append({"queries": qs, "cands": cands, "emb": [emb[j] for j in qs]})
    return draws


def run(shipped: Shipped, cfg: BenchConfig, cache_dir: str = ".cache/msif",
        progress: bool = False) -> dict:  # fmt: skip
    """Everything the benchmark measures, as the JSON payload (no files written)."""
    t_start = time.perf_counter()
    world, timings = shipped.world, {}
    docs = [(d.doc_id, d.text) for d in world.documents]
    pairs = [(p.prompt, p.answer) for p in world.finetune_qa]
    acfg = AttributionConfig(cache_dir=cache_dir, progress=progress)
    att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer, docs, pairs,
                     acfg, alpha=shipped.alpha)  # fmt: skip
    with Timer() as t:
        draws = build_draws(att, world, cfg)
    timings["retrieval_s"] = t.seconds
    used = sorted({j for d in draws for j in d["queries"]})
    row = {j: r for r, j in enumerate(used)}
    qs = [world.queries[j] for j in used]
    union = sorted({c for d in draws for cs in d["cands"] + d["emb"] for c in cs})
    col = {d: i for i, d in enumerate(union)}
    scores: dict[str, np.ndarray] = {}  # setting → (Q, N) or (Q, N, L)
    emb = att.embedding_index  # queries embedded in one batch; same cosine as emb.scores
    pos = {d: i for i, d in enumerate(emb.doc_ids)}
    vecs = emb.index.reconstruct_batch(np.array([pos[d] for d in union]))
    for name, text_of in (("", lambda q: q.prompt), ("_qa", qa_text)):
        texts = [text_of(q) for q in qs]
        scores["embedding" + name] = embed_texts(emb.embedder, texts, progress=False) @ vecs.T
        scores["bm25" + name] = np.stack([att.bm25_index.scores(t, union) for t in texts])
    cands = [att.candidate(d) for d in union]
    with Timer() as t:
        qg = att.query_grads(qs, "finetuned")
        _ = att.finetune_factors, att.pretrain_factors
    timings["query_grads_and_factors_s"] = t.seconds
    with Timer() as t:  # θ_ft candidates first, then freed: one model's gradients in memory
        ft_store = GradientStore(att.finetuned, att.task, att.ft_modules, att.collate,
                                 att.cache / "grads", batch_size=acfg.batch_size,
                                 dtype=GRAD_DTYPE, progress=progress)  # fmt: skip
        pre = att.preconditioned("finetune_only", qg)
        scores["finetune_only"] = CandidateGrads(ft_store, cands).scores(pre).sum(-1).numpy()
    timings["finetune_only_s"] = t.seconds
    with Timer() as t:
        store = GradientStore(att.pretrained, att.task, att.modules, att.collate,
                              att.cache / "grads", batch_size=acfg.batch_size,
                              dtype=GRAD_DTYPE, progress=progress)  # fmt: skip
        grads = CandidateGrads(store, cands)
    timings["candidate_grads_s"] = t.seconds
    with Timer() as t:
        dot = grads.scores(qg).sum(-1)
        qn = sum(v.double().pow(2).sum((-2, -1)) for v in qg.values()).sqrt()
        scores["grad_dot"] = dot.numpy()
        scores["grad_cosine"] = (dot / (qn[:, None] * grads.norms()[None, :])).numpy()
    timings["grad_dot_s"] = t.seconds
    alpha = shipped.alpha
    ft64, pt64 = as_float64(att.finetune_factors), as_float64(att.pretrain_factors)
    plan = [(f * alpha, list(cfg.dampings) if f == 1.0 else [None]) for f in cfg.alpha_factors]
    with Timer() as t:
        for a, lams in plan:
            for a_, lam, pre in multistage_pre(ft64, pt64, qg, [a], lams):
                scores[f"ms|{a_:g}|{lam}"] = grads.scores(pre).numpy()
    timings["multi_stage_sweeps_s"] = t.seconds
    lam_min = min((x for x in cfg.dampings if x is not None), default=None)
    ck_q = list(range(min(cfg.n_check, len(qs))))
    ck_docs = sorted({d for j in ck_q for d in qs[j].source_doc_ids} | set(union[:48]))
    ck_n = [col[d] for d in ck_docs]
    checks = run_checks(att, ft64, pt64, {k: v[ck_q] for k, v in qg.items()}, [qs[j] for j in ck_q],
                        [cands[i] for i in ck_n], alpha,
                        {lam: scores[f"ms|{alpha:g}|{lam}"][ck_q][:, ck_n] for lam in
                         {None, lam_min}})  # fmt: skip
    with Timer() as t:
        qg_pt = att.query_grads(qs, "pretrained")
        scores["single_stage"] = grads.scores(att.preconditioned("single_stage", {}, qg_pt)).sum(
            -1).numpy()  # fmt: skip
    timings["single_stage_s"] = t.seconds
    n_params = sum(v.shape[1] for v in grads.g.values())
    del qg, qg_pt, grads
    ms = scores[f"ms|{alpha:g}|None"]
    mlp_l = [i for i, m in enumerate(att.modules) if m.group == "mlp"]
    attn_l = [i for i, m in enumerate(att.modules) if m.group == "attention"]
    scores["multi_stage"] = ms.sum(-1)
    scores["multi_stage_mlp"] = ms[..., mlp_l].sum(-1)
    truth = {j: set(world.queries[j].source_doc_ids) for j in used}
    true_mask = np.zeros(ms.shape[:2], dtype=bool)
    for j in used:
        true_mask[row[j], [col[d] for d in truth[j] if d in col]] = True
    shares = tm.mlp_shares(ms[..., mlp_l].sum(-1), ms[..., attn_l].sum(-1), true_mask)

    top1: dict[str, list] = {}

    def metrics(key: str, pool: str = "cands", keep: bool = False) -> dict:
        s = scores[key] if scores[key].ndim == 2 else scores[key].sum(-1)
        per_draw = []
        for i, d in enumerate(draws):
            rng = np.random.default_rng([cfg.seed, i, 7])
            mrr, rec, rrs, firsts = tm.evaluate(s, col, d[pool], [truth[j] for j in d["queries"]],
                                               [row[j] for j in d["queries"]], rng)  # fmt: skip
            per_draw.append((mrr, rec))
            if keep:
                for j, rr in zip(d["queries"], rrs):
                    per_query.setdefault(key, {}).setdefault(j, []).append(rr)
                top1.setdefault(key, []).extend(zip(d["queries"], firsts))
        return tm.summarize(per_draw)

    methods = ("multi_stage", "single_stage", "finetune_only", "grad_dot", "grad_cosine",
               "embedding", "bm25")  # fmt: skip
    per_query: dict[str, dict[int, list[float]]] = {}
    res = {m: metrics(m, keep=True) for m in methods + ("embedding_qa", "bm25_qa")}
    damp = {("heuristic" if lam is None else f"{lam:g}"): metrics(f"ms|{alpha:g}|{lam}")
            for lam in cfg.dampings}  # fmt: skip
    alph = {f"{f:g}": {**metrics(f"ms|{f * alpha:g}|None"), "alpha": f * alpha}
            for f in cfg.alpha_factors}  # fmt: skip
    emb_c = {m: metrics(m, "emb") for m in methods}
    answered = greedy_answers(att.finetuned, att.tokenizer, [q.prompt for q in qs])
    correct = {j: a.strip() == world.queries[j].answer for j, a in zip(used, answered)}
    full = {m: scores[m] for m in per_query} | {"multi_stage_mlp": scores["multi_stage_mlp"]}
    analysis = tm.analysis(world, per_query, top1, correct, full, row, union)
    timings["total_s"] = time.perf_counter() - t_start
    n_c = [len(c) for d in draws for c in d["cands"]]
    emb_recall = [len(truth[j] & set(e)) / len(truth[j])
                  for d in draws for j, e in zip(d["queries"], d["emb"])]  # fmt: skip
    setup = {
        **asdict(cfg), "fast": fast_mode(), "alpha_trained": alpha,
        "model": shipped.finetuned_meta.preset, "checkpoints": display_path(shipped.root),
        "world_preset": world.preset, "n_documents": len(docs),
        "n_queries_available": len(world.queries),
        "n_queries_per_draw": len(draws[0]["queries"]), "n_queries_scored": len(used),
        "mean_candidates_per_query": float(np.mean(n_c)), "n_union_candidates": len(union),
        "tracked_params": n_params, "candidate_grad_dtype": str(GRAD_DTYPE),
        "candidate_grad_bytes": len(union) * n_params * 2,
        "float32_would_be_bytes": len(union) * n_params * 4,
        "candidate_retrieval_query": "question + answer (BM25 top-k and embedding top-k)",
        "baseline_query": "question only (Attributor.scores); *_qa rows: question + answer",
        "mrr_std": "sample std (ddof=1) over draws", "ties": "broken by a seeded random order",
        "heuristic_lambda_pt": {k: float(v) for k, v in EKFACIHVP(
            att.pretrain_factors, Damping()).damping_values.items()},
        "alpha_in_scores": True, "multi_stage_factor_dtype": "float64", "timings_s": timings,
    }  # fmt: skip
    return {
        "methods": {m: res[m] for m in methods},
        "methods_text_with_answer": {m: res[m] for m in ("embedding_qa", "bm25_qa")},
        "damping_sweep": damp,
        "alpha_sweep": alph,
        "layers": {"all": res["multi_stage"], "mlp": metrics("multi_stage_mlp"),
                   "mlp_share": {**shares, "definition": tm.MLP_SHARE_DEFINITION}},  # fmt: skip
        "embedding_candidates": {**emb_c, "candidate_recall": float(np.mean(emb_recall))},
        "analysis": analysis,
        "checks": checks,
        "setup": setup,
    }


def run_checks(att, ft64, pt64, qg, qs, cands, alpha, ms_scores: dict) -> dict:
    """Our multi-stage composition (float64 factors) vs the Attributor's; bf16 vs float32
    candidate gradients (per λ_pt in `ms_scores`); the MLP part of the all-layer score
    (float32 gradients) vs a real include='mlp' Attributor."""
    q = len(qs)
    ref = att.preconditioned("multi_stage", qg)
    pres = {lam: p for _, lam, p in multistage_pre(ft64, pt64, qg, [alpha], list(ms_scores))}
    out = {"multistage_composition_max_rel_err": max(
        float((pres[None][k] - ref[k]).abs().max() / ref[k].abs().max()) for k in ref)}
    g32 = [per_sequence_grads(att.pretrained, att.task, att.collate(cands[i:i + 16]), att.modules)
           for i in range(0, len(cands), 16)]  # fmt: skip
    g32 = {m.name: torch.cat([g[m.name] for g in g32]).double() for m in att.modules}
    for lam, pre in pres.items():
        s32 = torch.stack([torch.einsum("qoi,noi->qn", pre[m.name].double(), g32[m.name])
                           for m in att.modules], -1)  # fmt: skip
        s16 = torch.from_numpy(ms_scores[lam].sum(-1))
        rho = [spearman(s16[i], s32.sum(-1)[i]) for i in range(q)]
        tag = "heuristic" if lam is None else f"{lam:g}"
        out |= {f"bf16_vs_fp32_spearman_min[{tag}]": min(rho),
                f"bf16_vs_fp32_max_rel_err[{tag}]": float(
                    (s16 - s32.sum(-1)).abs().max() / s32.sum(-1).abs().max())}  # fmt: skip
        if lam is None:
            part = s32[..., [i for i, m in enumerate(att.modules) if m.group == "mlp"]].sum(-1)
    mlp_att = Attributor(att.pretrained, att.finetuned, att.tokenizer, list(att.texts.items()),
                         att.finetune_pairs, replace(att.config, include="mlp"),
                         alpha=alpha)  # fmt: skip
    real = mlp_att.scores("multi_stage", qs, [c.doc_id for c in cands])
    return out | {
        "mlp_only_vs_mlp_part_spearman_min": min(spearman(real[i], part[i]) for i in range(q)),
        "mlp_only_vs_mlp_part_max_rel_err": float((real - part).abs().max() / real.abs().max()),
        "n_queries": q, "n_candidates": len(cands),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="msif-lite bench fact-tracing", description=__doc__)
    ap.add_argument("--preset", default="default", help="shipped world/checkpoints")
    ap.add_argument("--world", help="world directory (default data/world/<preset>)")
    ap.add_argument("--checkpoints", help="directory with pretrained/ and finetuned/")
    ap.add_argument("--cache-dir", default=".cache/msif", help="factor/gradient cache")
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
    write_results("fact_tracing", payload, tm.markdown(payload), a.out)
    tm.plots(payload, a.out)
    print(tm.markdown(payload))
    return 0

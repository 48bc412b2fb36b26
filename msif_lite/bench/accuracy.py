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
Writes <out>/accuracy.json, .md and .png.
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from msif_lite.attribution.attributor import Attributor
from msif_lite.bench import common
from msif_lite.config import pick
from msif_lite.engine.exact import (
    ConjugateGradientIHVP,
    LissaIHVP,
    PrecomputedIHVP,
    block_diagonal_ggn_matvec,
    ggn_matvec,
)
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, KFACIHVP, Damping, IdentityIHVP
from msif_lite.engine.layers import find_modules, flatten, unflatten
from msif_lite.engine.scores import pairwise_scores, precondition, query_gradients
from msif_lite.engine.tasks import LanguageModelingTask
from msif_lite.eval import metrics
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


def choose_documents(world, n_queries: int, n_candidates: int, n_fit: int, seed: int):
    """Seeded: queries, candidates = their true sources ∪ random documents, fitting docs
    (n_fit ≤ 0: every document of the corpus)."""
    rng = random.Random(seed)
    queries = rng.sample(world.queries, min(n_queries, len(world.queries)))
    sources = sorted({d for q in queries for d in q.source_doc_ids})
    rest = sorted(d.doc_id for d in world.documents if d.doc_id not in set(sources))
    extra = rng.sample(rest, max(0, min(n_candidates - len(sources), len(rest))))
    all_ids = sorted(d.doc_id for d in world.documents)
    fit = all_ids if n_fit <= 0 else rng.sample(all_ids, min(n_fit, len(all_ids)))
    return queries, sorted(sources + extra), fit


def lambda_max(matvec: Callable, p: int, iters: int, seed: int, dtype) -> float:
    """Largest eigenvalue of G by power iteration (Rayleigh quotient vᵀGv, ‖v‖ = 1)."""
    v = torch.randn(p, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    ray = 0.0
    for _ in range(iters):
        v = v / v.norm()
        gv = matvec(v)
        ray, v = float(v @ gv), gv
    return ray


def hutchinson_mean_eig(matvec: Callable, p: int, probes: int, seed: int, dtype) -> float:
    """trace(G)/P ≈ mean_k v_kᵀ G v_k / P with Rademacher v_k (one batched matvec)."""
    g = torch.Generator().manual_seed(seed + 1)
    v = (torch.randint(0, 2, (probes, p), generator=g) * 2 - 1).to(dtype)
    return float((v * matvec(v)).sum(1).mean()) / p


def correlations(scores: torch.Tensor, truth: torch.Tensor) -> dict:
    """Per-query Spearman and Pearson against the ground truth, mean ± std over queries."""
    scores, truth = scores.cpu(), truth.cpu()
    sp = torch.tensor([metrics.spearman(s, t) for s, t in zip(scores, truth)])
    pe = torch.tensor([metrics.pearson(s, t) for s, t in zip(scores, truth)])
    std = (lambda x: float(x.std()) if len(x) > 1 else 0.0)  # noqa: E731
    return {"spearman_mean": float(sp.mean()), "spearman_std": std(sp),
            "pearson_mean": float(pe.mean()), "pearson_std": std(pe),
            "spearman_per_query": sp.tolist()}  # fmt: skip


class _Run:
    """One accuracy run: the model in float64, its documents and queries, and the scores and
    timings of every method (each method is one `score` call on the same candidates)."""

    def __init__(self, shipped, args: argparse.Namespace):
        self.args, self.progress = args, not args.quiet
        world, tok = shipped.world, shipped.tokenizer
        docs = [(d.doc_id, d.text) for d in world.documents]
        pairs = [(p.prompt, p.answer) for p in world.finetune_qa]
        att = Attributor(shipped.pretrained, shipped.finetuned, tok, docs, pairs, alpha=1.0)
        # only its tokenisation is used: documents = text + eos; questions = prompt + answer
        dev = torch.device(args.device)
        self.model: nn.Module = shipped.pretrained.double().eval().to(dev)  # float64 truth
        self.task, self.dtype = LanguageModelingTask(), torch.float64
        self.queries, self.cand_ids, self.fit_ids = choose_documents(
            world, args.queries, args.candidates, args.fit, args.seed)
        bs, n_corpus = args.batch_size, len(world.documents)
        self.n_corpus = n_corpus
        # G is a sum over documents: batching them by length changes nothing but the padding
        fit = sorted((att.candidate(d) for d in self.fit_ids), key=lambda c: len(c.input_ids))
        self.fit_b = [att.collate(fit[i:i + bs]).to(dev) for i in range(0, len(fit), bs)]
        self.cand_b = [att.collate([att.candidate(d) for d in self.cand_ids[i:i + bs]]).to(dev)
                       for i in range(0, len(self.cand_ids), bs)]  # fmt: skip
        q_batch = att.collate([att.qa_example(q.prompt, q.answer) for q in self.queries]).to(dev)
        self.mods, self.mlp = find_modules(self.model), find_modules(self.model, include="mlp")
        self.n_params = sum(m.numel for m in self.mods)
        self.qg = query_gradients(self.model, self.task, q_batch, self.mods, bs)
        self.fcfg = FactorConfig(fisher="sampled", seed=args.seed, progress=self.progress)
        self.product_dtype = torch.float32 if args.products == "float32" else torch.float64
        self.matvec = ggn_matvec(self.model, self.task, self.fit_b, self.mods,
                                 dtype=self.product_dtype, cache=True)  # fmt: skip
        self.matvec64 = ggn_matvec(self.model, self.task, self.fit_b, self.mods)
        self.on_update: Callable[[], None] | None = None  # e.g. write partial results
        self.results: dict[str, dict] = {}
        self.scores: dict[str, torch.Tensor] = {}

    @staticmethod
    def fitted(fn: Callable):
        """(factors, seconds, peak MiB) of one factor fit."""
        with common.PeakMemory() as mem, common.Timer() as t:
            out = fn()
        return out, t.seconds, mem.peak_mb

    def score(self, name: str, ihvp, fit_s: float = 0.0, fit_mb: float = 0.0,
              mlp_only: bool = False, solve_s: float = 0.0) -> None:  # fmt: skip
        """score_s: preconditioning the queries, P = (G+λI)⁻¹∇m, + scoring every candidate
        (+ solve_s: a solve done beforehand, e.g. the share of a run a snapshot came from)."""
        modules = self.mlp if mlp_only else self.mods
        grads = {m.name: self.qg[m.name] for m in modules}
        with common.PeakMemory() as mem, common.Timer() as t, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a budgeted CG warns that it did not converge
            with torch.no_grad():  # no graph through the preconditioned queries
                pre = precondition(grads, ihvp)
            self.scores[name] = pairwise_scores(self.model, self.task, pre, self.cand_b, ihvp,
                                                modules, preconditioned=True, progress=False)
        self.results[name] = {"fit_s": fit_s, "score_s": t.seconds + solve_s,
                              "peak_mem_mb": max(fit_mb, mem.peak_mb), "layers": len(modules)}
        if self.progress:
            print(f"  {name}: fit {fit_s:.1f}s, score {t.seconds + solve_s:.1f}s", flush=True)
        if self.on_update is not None:
            self.on_update()

    def spectrum(self) -> None:
        """The exact G's scale: λ is set relative to its mean eigenvalue trace(G)/P."""
        a = self.args
        with common.Timer() as t, torch.no_grad():
            self.mean_eig = hutchinson_mean_eig(self.matvec, self.n_params, a.probes, a.seed,
                                                self.dtype)  # fmt: skip
            self.top = lambda_max(self.matvec, self.n_params, a.power_iters, a.seed, self.dtype)
        self.spectrum_s = t.seconds
        self.lam = float(a.damping) if a.damping is not None else a.damping_rel * self.mean_eig
        self.lissa_scale = 1.05 * (self.top + self.lam)  # converges for scale > λ_max(G+λI)/2
        if self.progress:
            print(f"  λ = {self.lam:.3g} = {self.lam / self.mean_eig:.3g} × trace(G)/P "
                  f"(Hutchinson); λ_max(G) ≈ {self.top:.3g}", flush=True)

    def ekfac_and_kfac(self, suffix: str, batches: list):
        """Fit and score EK-FAC and K-FAC on all tracked layers; returns the EK-FAC factors."""
        m, t, c, lam = self.model, self.task, self.fcfg, Damping(absolute=self.lam)
        ek, s, mb = self.fitted(lambda: fit_ekfac(m, t, batches, c, self.mods))
        self.ekfac_ihvp = EKFACIHVP(ek, lam)  # the last one (most draws) preconditions the truth
        self.score(f"ekfac{suffix}", self.ekfac_ihvp, s, mb)
        kf, s, mb = self.fitted(lambda: fit_eigenbasis(fit_covariances(m, t, batches, c,
                                                                       self.mods)))  # fmt: skip
        self.score(f"kfac{suffix}", KFACIHVP(kf, lam), s, mb)
        return ek

    def approximations(self) -> None:
        """The curvature approximations, all on the same documents with the same λ."""
        ek = self.ekfac_and_kfac("", self.fit_b)  # one sampled label per token
        ek_m, s, mb = self.fitted(lambda: fit_ekfac(self.model, self.task, self.fit_b, self.fcfg,
                                                    self.mlp))  # fmt: skip
        self.score("ekfac_mlp", EKFACIHVP(ek_m, Damping(absolute=self.lam)), s, mb, True)
        self.score("grad_dot", IdentityIHVP())
        for r in self.args.label_draws:  # the same documents, r label draws per token
            self.ekfac_and_kfac(f"_draws{r}", self.fit_b * r)
        # Σ Λ = (1/N) Σ_n ‖DW_n‖² (one label draw per token) is an unbiased but heavy-tailed
        # estimate of trace(G): rare labels carry much of it, so it typically comes out low.
        self.trace_ekfac = sum(float(f.lam.sum()) for f in ek.layers) / self.n_params

    def preconditioner(self) -> Callable | None:
        """Flat r ↦ (G_EKFAC + λI)⁻¹ r for the ground truth's PCG (None: plain CG)."""
        if self.args.precondition == "none":
            return None
        ihvp, mods = self.ekfac_ihvp, self.mods
        return lambda r: flatten(ihvp.apply(unflatten(r, mods)), mods)

    def iterative(self) -> None:
        """Ground truth (PCG on the exact G, float64 recurrences and residuals), then the
        budgeted iterative methods: one run each of CG and LiSSA at the largest budget,
        scored at every budget from its snapshots (the same iterates as shorter runs)."""
        a, mv, mods, lam, pr = self.args, self.matvec, self.mods, self.lam, self.progress
        plain = a.precondition == "none"  # then cg_k are the truth's own first k iterates
        self.gt = ConjugateGradientIHVP(mv, mods, lam, max_iter=a.max_iter, tol=a.tol,
                                        progress=pr, preconditioner=self.preconditioner(),
                                        check_matvec=self.matvec64, refine=a.refine,
                                        snapshots=a.cg if plain else (),
                                        time_limit_s=a.gt_time_limit)  # fmt: skip
        self.score("ground_truth", self.gt)
        self.truth = self.scores.pop("ground_truth")
        self.gt_info = self.results.pop("ground_truth")
        self.truth_stability = self.stability(self.gt)
        if plain:
            per_product = self.gt_info["score_s"] / max(1, int(self.gt.iterations.max()))
            self.from_snapshots("cg", self.gt, a.cg, per_product)
        else:
            cg = ConjugateGradientIHVP(mv, mods, lam, max_iter=max(a.cg), tol=0.0, progress=pr,
                                       snapshots=a.cg)  # fmt: skip
            self.budgets("cg", cg, a.cg)
        li = LissaIHVP(mv, mods, lam, depth=max(a.lissa), scale=self.lissa_scale, progress=pr,
                       snapshots=a.lissa)  # fmt: skip
        self.budgets("lissa", li, a.lissa)
        self.results[f"lissa_{max(a.lissa)}"]["last_increment_max"] = float(li.increments.max())

    def stability(self, solver) -> dict | None:
        """How settled the truth's ranking is: Spearman of the scores from x before the last
        refinement round (a less converged solution, its true residual given) against the
        final scores. None if no refinement round ran."""
        if getattr(solver, "round_solutions", None):
            x, what = solver.round_solutions[-1], "x before the last refinement round"
            res = solver.round_residuals[len(solver.round_solutions) - 1]
        elif getattr(solver, "late_solution", None) is not None:
            x = solver.late_solution
            what = f"x at iteration {solver.late_iteration} (3/4 of the time limit)"
            b = flatten({m.name: self.qg[m.name] for m in self.mods}, self.mods)
            with torch.no_grad():
                r = b - (self.matvec64(x) + self.lam * x)
            res = (r.norm(dim=1) / b.norm(dim=1)).tolist()
        else:
            return None
        keep, self.on_update = self.on_update, None
        self.score("_earlier", PrecomputedIHVP(x, self.mods))
        self.on_update = keep
        self.results.pop("_earlier")
        out = correlations(self.scores.pop("_earlier"), self.truth)
        out.update(compared=what, residual_of_compared=res)
        return out

    def budgets(self, kind: str, solver, ks: Sequence[int]) -> None:
        """Solve once at max(ks); score each budget k from the snapshot x_k, charged k/max
        of the solve's time (each iteration is one batched G·v)."""
        with torch.no_grad(), warnings.catch_warnings(), common.Timer() as t:
            warnings.simplefilter("ignore")  # a budgeted CG warns that it did not converge
            solver.solve(flatten({m.name: self.qg[m.name] for m in self.mods}, self.mods))
        self.from_snapshots(kind, solver, ks, t.seconds / max(ks))

    def from_snapshots(self, kind: str, solver, ks: Sequence[int], per_product: float) -> None:
        """Score `<kind>_<k>` from the solver's snapshot x_k, charged k products' time."""
        for k in sorted(ks):
            pre = PrecomputedIHVP(solver.snapshot_solutions[k], self.mods)
            self.score(f"{kind}_{k}", pre, solve_s=per_product * k)
            self.results[f"{kind}_{k}"]["products"] = k

    def block_truth(self) -> None:
        """The exact per-layer blocks of G: separates the block-diagonal approximation's cost
        (block_exact vs ground truth) from the Kronecker one (EK-FAC vs block_exact)."""
        a = self.args
        fast = block_diagonal_ggn_matvec(self.model, self.task, self.fit_b, self.mods,
                                         dtype=self.product_dtype, cache=True)  # fmt: skip
        exact64 = block_diagonal_ggn_matvec(self.model, self.task, self.fit_b, self.mods)
        block = ConjugateGradientIHVP(fast, self.mods,
                                      self.lam, max_iter=a.max_iter, tol=a.tol,
                                      progress=self.progress, check_matvec=exact64,
                                      refine=a.refine, time_limit_s=a.gt_time_limit)  # fmt: skip
        self.score("block_exact", block)
        self.results["block_exact"]["iterations_max"] = int(block.iterations.max())
        self.results["block_exact"]["relative_residual_max"] = float(block.residuals.max())
        self.results["block_exact"]["relative_residual"] = block.residuals.tolist()
        self.results["block_exact"]["stopped_by_time"] = bool(block.stopped_by_time)
        for name in self.results:
            self.results[name]["vs_block_exact"] = correlations(self.scores[name],
                                                                self.scores["block_exact"])

    def ground_truth_info(self) -> dict:
        a, gt = self.args, self.gt
        converged = gt.residuals < a.converged_below
        info = {
            "method": "conjugate gradient on the full GGN (all tracked layers, not "
                      f"block-diagonal), batched over queries: {a.products} G·v products, "
                      "float64 recurrences, preconditioner "
                      f"{'EK-FAC (most label draws)' if a.precondition == 'ekfac' else 'none'}, "
                      f"up to {a.refine} rounds of iterative refinement with float64 residuals",
            "tol": a.tol, "max_iter": a.max_iter, "converged_below": a.converged_below,
            "iterations": gt.iterations.tolist(), "relative_residual": gt.residuals.tolist(),
            "residual_before_each_refinement": getattr(gt, "round_residuals", []),
            "all_converged": bool(converged.all()), "score_s": self.gt_info["score_s"],
            "stability": self.truth_stability, "time_limit_s": a.gt_time_limit,
            "stopped_by_time": bool(getattr(gt, "stopped_by_time", False)),
            "peak_mem_mb": self.gt_info["peak_mem_mb"],
            "check": "relative residual ‖b − (G+λI)x‖/‖b‖ recomputed with one more float64 "
                     "G·x after CG stops; converged = residual < converged_below for every query",
        }  # fmt: skip
        if not info["all_converged"]:
            warnings.warn("ground-truth CG did not converge for every query; see the JSON",
                          stacklevel=2)  # fmt: skip
        return info

    def setup_info(self, model_label: str) -> dict:
        a, lam = self.args, self.lam
        n_tok = sum(int(b.attention_mask.sum()) for b in self.fit_b)
        arch = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        return {
            "model": model_label, "n_params_tracked": self.n_params,
            "architecture": {k: getattr(self.model.config, k, None) for k in arch},
            "layers": [m.name for m in self.mods], "mlp_layers": [m.name for m in self.mlp],
            "queries": [q.fact_id for q in self.queries], "n_queries": len(self.queries),
            "n_candidates": len(self.cand_ids),
            "n_true_sources": len({d for q in self.queries for d in q.source_doc_ids}),
            "n_fit_sequences": len(self.fit_ids), "n_fit_tokens": n_tok,
            "n_corpus_docs": self.n_corpus, "products": a.products,
            "fit_doc_ids": self.fit_ids,
            "label_draws": "ekfac/kfac: one sampled label per token (as the paper and "
                           "kronfluence); <name>_draws<R>: R draws",
            "extra_label_draws": list(a.label_draws),
            "G": "exact GGN (= true Fisher) of (1/N) Σ_n ℓ(z_n), ℓ summed over tokens; "
                 "K-FAC/EK-FAC fitted on the same documents with sampled labels",
            "damping": lam, "damping_rel_to_mean_eig": lam / self.mean_eig,
            "mean_eig": self.mean_eig, "mean_eig_estimate": f"Hutchinson, {a.probes} "
            "Rademacher probes on the exact G", "mean_eig_ekfac_sum_lambda": self.trace_ekfac,
            "lambda_max": self.top, "lambda_max_estimate": f"power iteration, {a.power_iters} "
            "steps", "condition_number": (self.top + lam) / lam, "lissa_scale": self.lissa_scale,
            "spectrum_estimate_s": self.spectrum_s, "dtype": "float64", "seed": a.seed,
            "query_measurement": "m = −log p(answer | prompt), loss on answer tokens (+ eos)",
            "candidate_loss": "ℓ = Σ_t −log p(x_t | x_<t) over the document + eos",
        }  # fmt: skip


def payload_of(r: _Run, args: argparse.Namespace, model_label: str) -> dict:
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
    r = _Run(shipped, args)
    if on_update is not None:
        r.on_update = lambda: on_update(payload_of(r, args, model_label))
    r.spectrum()
    r.approximations()
    r.iterative()
    if args.block_truth:
        r.block_truth()
    return payload_of(r, args, model_label)


def ordered(names) -> list[str]:
    """Table order: the curvature approximations, CG and LiSSA by budget, then grad_dot."""
    kinds = ("ekfac", "ekfac_mlp", "kfac", "cg", "lissa", "grad", "block")
    return sorted(names, key=lambda n: (max(i for i, k in enumerate(kinds) if n.startswith(k)),
                                        len(n), n))  # fmt: skip


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
    """How settled the truth's ranking is (see `_Run.stability`), as a markdown paragraph."""
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


def main(argv: Sequence[str] | None = None) -> int:
    """`msif-lite bench accuracy`: run, then write <out>/accuracy.json and .md."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped, label = load(args)
    payload = run(shipped, args, label)
    path = common.write_results("accuracy", payload, markdown(payload), args.out)
    plot(payload, path.with_suffix(".png"))
    print(markdown(payload))
    print(f"wrote {path}")
    return 0

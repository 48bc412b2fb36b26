"""Experiment 1's measurement (`msif-lite bench accuracy`, msif_lite/bench/accuracy.py): the
model in float64, the seeded queries, candidates and fitting documents, and every method's
scores and timings against the exact-GGN ground truth (CG on the full G, float64
recurrences and residual checks), optionally the exact block-diagonal solve.
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from msif_lite.attribution.encoder import Encoder
from msif_lite.bench import common
from msif_lite.engine.curvature import CURVATURES
from msif_lite.engine.exact import (
    ConjugateGradientIHVP,
    LissaIHVP,
    PrecomputedIHVP,
    block_diagonal_ggn_matvec,
    ggn_matvec,
)
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, Damping, IdentityIHVP
from msif_lite.engine.layers import find_modules, flatten, unflatten
from msif_lite.engine.scores import pairwise_scores, precondition, query_gradients
from msif_lite.engine.tasks import LanguageModelingTask
from msif_lite.eval import metrics


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


class AccuracyRun:
    """One accuracy run: the model in float64, its documents and queries, and the scores and
    timings of every method (each method is one `score` call on the same candidates)."""

    def __init__(self, shipped, args: argparse.Namespace):
        self.args, self.progress = args, not args.quiet
        world, tok = shipped.world, shipped.tokenizer
        docs = [(d.doc_id, d.text) for d in world.documents]
        enc = Encoder.for_model(shipped.pretrained, tok)  # documents = text + eos; questions
        texts = dict(docs)  # = the template's prompt + answer (the Attributor's encoding)
        dev = torch.device(args.device)
        self.model: nn.Module = shipped.pretrained.double().eval().to(dev)  # float64 truth
        self.task, self.dtype = LanguageModelingTask(), torch.float64
        self.queries, self.cand_ids, self.fit_ids = choose_documents(
            world, args.queries, args.candidates, args.fit, args.seed)
        bs, n_corpus = args.batch_size, len(world.documents)
        self.n_corpus = n_corpus
        # G is a sum over documents: batching them by length changes nothing but the padding
        fit = sorted((enc.document(d, texts[d]) for d in self.fit_ids),
                     key=lambda c: len(c.input_ids))  # fmt: skip
        self.fit_b = [enc.collate(fit[i:i + bs]).to(dev) for i in range(0, len(fit), bs)]
        self.cand_b = [enc.collate([enc.document(d, texts[d])
                                    for d in self.cand_ids[i:i + bs]]).to(dev)
                       for i in range(0, len(self.cand_ids), bs)]  # fmt: skip
        q_batch = enc.query_batch(self.queries).to(dev)
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

    def registered(self, suffix: str, batches: list):
        """Fit and score every registered curvature that has factors (EK-FAC, K-FAC, the
        diagonal, …: `engine.curvature.CURVATURES`) on all tracked layers, each under its
        registry name; returns the EK-FAC factors."""
        m, t, c, lam, ek = self.model, self.task, self.fcfg, Damping(absolute=self.lam), None
        for name, curv in CURVATURES.items():
            if not curv.needs_factors:
                continue  # the identity: grad_dot below
            f, s, mb = self.fitted(lambda curv=curv: curv.fit(m, t, batches, c, self.mods))
            ihvp = curv.inverse(f, lam)
            if name == "ekfac":  # the last one (most draws) preconditions the truth
                self.ekfac_ihvp, ek = ihvp, f
            self.score(f"{name}{suffix}", ihvp, s, mb)
        return ek

    def approximations(self) -> None:
        """The curvature approximations, all on the same documents with the same λ."""
        ek = self.registered("", self.fit_b)  # one sampled label per token
        ek_m, s, mb = self.fitted(lambda: fit_ekfac(self.model, self.task, self.fit_b, self.fcfg,
                                                    self.mlp))  # fmt: skip
        self.score("ekfac_mlp", EKFACIHVP(ek_m, Damping(absolute=self.lam)), s, mb, True)
        self.score("grad_dot", IdentityIHVP())
        for r in self.args.label_draws:  # the same documents, r label draws per token
            self.registered(f"_draws{r}", self.fit_b * r)
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


# ruff: noqa: E501  (the cells are notebook text, wrapped as the notebook shows them)
"""Write notebooks/10_counterfactual_evaluation.ipynb from the cells below (sources only;
`python tools/execute_notebooks.py notebooks/10_*.ipynb` then stores real outputs)."""

from __future__ import annotations

from pathlib import Path

import nbformat

MD, CODE = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell


def solution(src: str):
    c = CODE("# Solution (click to expand)\n" + src)
    c.metadata = {"jupyter": {"source_hidden": True, "outputs_hidden": True}, "tags": ["solution"]}
    return c


CELLS = [
    MD("""# 10 · Does influence predict retraining?

**What this notebook teaches.** Notebooks 06–08 judged attribution by *which documents state the fact*. Influence functions answer another question: *if these pre-training documents had not been there, how would the fine-tuned model's answer change?* The honest ground truth for that question is retraining — here, re-pre-training **and** re-fine-tuning. We

1. derive the **datamodel view** (a linear model of the outcome in the subset indicator) and the **linear datamodeling score** (LDS; Park et al. 2023) in plain torch on a tiny two-stage convex problem, where exact multi-stage influence should reach a high LDS — and check it;
2. load the kit's **shipped retraining ground truth** for its language model (32 half-corpus subsets, each re-pre-trained and re-fine-tuned; 8 of them again with another data-order seed), compute every registered method's LDS beside the **retraining noise ceiling**, on two worlds: one where the stating documents are lexically obvious and one built so they are not;
3. put the two questions side by side: fact-tracing MRR (states the fact) against LDS and **leave-top-k-out** (causes the answer);
4. rerun a few of the shipped retrains live, to show the shipped numbers are reproducible.

**Prerequisites.** Notebook 07 (the multi-stage formula, the convex two-stage check, fact tracing) and 05 (the world and its training pipeline).

**Conventions.** I(z, q) > 0 means z helps q: up-weighting z by ε changes m(q) = −log p(answer | prompt) by −ε·I. Removing z is ε = −1/N."""),
    CODE("""import copy
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.func import grad, hessian, vmap

import msif_lite
from msif_lite import cmp, pick
from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import METHODS, GradientMethod
from msif_lite.eval.convex import fit_convex, trainable_vector
from msif_lite.engine.tasks import ClassificationTask
from msif_lite.eval.metrics import lds, mean_reciprocal_rank, sem, spearman, subset_predictions
from msif_lite.eval.retraining import GroundTruth, RetrainConfig, measure, outcome, retrain, subset_masks
from msif_lite.world.shipped import data_dir, load_shipped

print(msif_lite.describe_run())
transformers.utils.logging.disable_progress_bar()
torch.manual_seed(0)
torch.set_num_threads(1)  # the retrains below are timed for one core, as the shipped ground truth was made"""),
    MD("""## 1. The datamodel view

Take a training set of N documents and a subset S (a 0/1 indicator vector **1**_S). Removing document z is up-weighting it by ε = −1/N, so to first order the effect of removing every document outside S adds up:

  m(S) ≈ m(all) + (1/N) Σ_{z ∉ S} I(z, q) = c_q − (1/N) Σ_{z ∈ S} I(z, q).

That is a **linear model of the outcome in the subset indicator** — a *datamodel* — with weights −I(z, q)/N. It predicts, for every subset S_j, a number that should order the subsets the way retraining does. The **LDS** of a query is the Spearman correlation, over M random subsets, between the prediction −Σ_{z∈S_j} I(z, q) and the measured m_j(q) after retraining on S_j; the scale 1/N and the constant c_q drop out of a rank correlation. Report the mean over queries with its standard error.

Two things make the LDS hard even for an exact influence function: subsets of half the corpus are far from a single-document perturbation (the first-order model is only a model), and retraining has noise of its own. So an LDS is read beside two references: random scores (≈ 0) and the **noise ceiling** — the same Spearman between two retrainings of the same subsets with another data-order seed.

## 2. A two-stage convex problem

The problem of notebook 07 §2: softmax regression pre-trained with L2 λ_pt, then fine-tuned with the proximity term (α/2)‖θ − θ_pt‖². `fit_convex` solves both stages exactly, so "retraining" is exact and the only error left is the first-order model itself."""),
    CODE("""D, C, N_PT, N_FT, LAM_PT, ALPHA = 5, 4, 60, 30, 1e-2, 0.5
f64 = torch.float64
gen = torch.Generator().manual_seed(0)
teacher = torch.randn(C, D, dtype=f64, generator=gen)
x_pt = torch.randn(N_PT, D, dtype=f64, generator=gen)
y_pt = torch.multinomial(torch.softmax(x_pt @ teacher.T, -1), 1, generator=gen).squeeze(1)
x_ft = torch.randn(N_FT, D, dtype=f64, generator=gen) + 0.7
y_ft = torch.multinomial(torch.softmax(x_ft @ (teacher + 0.5).T, -1), 1, generator=gen).squeeze(1)
xq = torch.randn(8, D, dtype=f64, generator=gen)  # 8 queries; m(q) = their loss at θ_ft
yq = torch.randint(0, C, (8,), generator=gen)
task = ClassificationTask()


def two_stage(weights=None):
    # pre-train on the weighted data (weight 0 = removed), then fine-tune with the proximity term
    model = torch.nn.Linear(D, C).double()
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    fit_convex(model, task, (x_pt, y_pt), LAM_PT, weights, tol=1e-12)
    pt = copy.deepcopy(model)
    fit_convex(model, task, (x_ft, y_ft), ALPHA, anchor=trainable_vector(pt), tol=1e-12)
    return pt, model


def losses(theta, x, y):
    W, b = theta[: C * D].view(C, D), theta[C * D:]
    return F.cross_entropy(x @ W.T + b, y, reduction="none")


def mean_loss(theta, x, y):
    return losses(theta, x, y).mean()


pt_model, ft_model = two_stage()
th_pt, th_ft = trainable_vector(pt_model), trainable_vector(ft_model)
P = th_pt.numel()
H_pt = hessian(mean_loss)(th_pt, x_pt, y_pt)
H_ft = hessian(mean_loss)(th_ft, x_ft, y_ft)
I = torch.eye(P, dtype=f64)
per_example_grad = vmap(grad(lambda t, x, y: losses(t, x[None], y[None]).sum()), in_dims=(None, 0, 0))
g_cand, g_query = per_example_grad(th_pt, x_pt, y_pt), per_example_grad(th_ft, xq, yq)
# exact scores, (Q, N): multi-stage, single-stage (α → ∞), and the plain gradient dot product
I_ms = ALPHA * torch.linalg.solve(H_pt + LAM_PT * I, torch.linalg.solve(H_ft + ALPHA * I, g_query.T)).T @ g_cand.T
I_single = torch.linalg.solve(H_pt + LAM_PT * I, g_query.T).T @ g_cand.T
I_dot = g_query @ g_cand.T
I_rand = torch.randn(len(xq), N_PT, dtype=f64, generator=gen)
print(f"{P} parameters, {N_PT} pre-training and {N_FT} fine-tuning examples, {len(xq)} queries")"""),
    MD("""**Retrain every subset, both stages.** M subsets keep a fraction of the pre-training examples (drawn by `subset_masks`, seeded); each is re-pre-trained and re-fine-tuned exactly. We use two fractions: half the data (the usual LDS choice: dattri, kronfluence, bergson) and 90 % (closer to the first-order regime)."""),
    CODE("""M = pick(48, 24)
measured, masks = {}, {}
for frac in (0.5, 0.9):
    masks[frac] = subset_masks(N_PT, M, frac, seed=0)
    rows = []
    for j in range(M):
        _, ft_j = two_stage(masks[frac][j].double())
        with torch.no_grad():
            rows.append(task.measurement(ft_j, (xq, yq)))
    measured[frac] = torch.stack(rows)  # (M, Q)
print(f"{2 * M} two-stage retrains ({M} subsets × 2 fractions)")"""),
    MD("""**The LDS by hand, then with the library.** Prediction for subset j: −Σ_{z∈S_j} I(z, q) = −(mask_j · I_q). Spearman = Pearson correlation of the ranks."""),
    CODE("""def ranks(x):
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r  # (no ties here: continuous values)


def lds_by_hand(scores, mask, m):
    pred = -(mask.double() @ scores.T)  # (M, Q)
    return torch.tensor([float(torch.corrcoef(torch.stack([ranks(pred[:, q]), ranks(m[:, q])]))[0, 1])
                         for q in range(m.shape[1])])


lds_rows = {}
for frac in (0.5, 0.9):
    for name, s in (("multi-stage", I_ms), ("single-stage", I_single), ("grad dot", I_dot), ("random", I_rand)):
        lds_rows[(frac, name)] = lds(s, masks[frac], measured[frac])
hand_row = cmp("LDS by hand vs msif_lite.eval.metrics.lds", lds_by_hand(I_ms, masks[0.5], measured[0.5]),
               lds_rows[(0.5, "multi-stage")], atol=1e-12)
print(f"{'scores':<14s}{'LDS, half the data':>22s}{'LDS, 90% of the data':>24s}")
for name in ("multi-stage", "single-stage", "grad dot", "random"):
    a, b = lds_rows[(0.5, name)], lds_rows[(0.9, name)]
    print(f"{name:<14s}{a.mean():>14.3f} ± {sem(a.tolist()):.3f}{b.mean():>16.3f} ± {sem(b.tolist()):.3f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, frac in zip(axes, (0.5, 0.9)):
    pred = subset_predictions(I_ms, masks[frac])[:, 0]
    ax.scatter(pred, measured[frac][:, 0], s=14)
    rho = spearman(pred, measured[frac][:, 0])
    ax.set(xlabel="prediction −Σ_{z∈S_j} I_ms(z, q)", ylabel="m_j(q) after retraining both stages",
           title=f"query 0, keep {frac:.0%}: Spearman {rho:.3f}")
fig.tight_layout()
plt.show()"""),
    MD("""Exact multi-stage influence orders the retrained subsets well, and better with 90 % of the data kept than with half: the closer the subsets are to the full set, the better a first-order (linear) model of the outcome holds. At half the data, the linearisation error is as large as what the fine-tuning stage adds, so multi-stage and single-stage LDS are within a standard error of each other; at 90 % multi-stage is ahead. The plain gradient dot product lacks the curvature and ranks the subsets much worse; random scores sit near 0. These are the yardsticks for the language model: even a *perfect* first-order method does not reach 1 on half-corpus subsets.

## 3. The language model's retraining ground truth

The `lds` world (`msif_lite.world.generate.WORLD_PRESETS["lds"]`): 26 fictional people, 200 pre-training documents, 52 held-out questions whose facts appear only in pre-training; the `lds` pipeline trains the kit's `ci-fast` GPT-NeoX (2 layers, hidden 128) for 600 pre-training and 100 proximity fine-tuning steps — about 45 s for both stages on one CPU core. `msif-lite bench lds` retrained it on 32 random halves of the corpus (same initialisation, schedule, fine-tuning data and α) and measured every question; 8 subsets again with another data-order seed. It shipped the result as `data/lds/lds.json`, keyed to the world and tokenizer (loading it for another world is refused)."""),
    CODE("""shipped = load_shipped("lds")
world = shipped.world
gt = GroundTruth.load(data_dir() / "lds" / "lds.json", world, shipped.tokenizer)
M_LM, N_LM = gt.masks.shape
print(f"{N_LM} documents, {len(world.queries)} questions, {M_LM} subsets of {int(gt.masks[0].sum())} documents, "
      f"{gt.m_noise.shape[0]} re-seeded; one retrain ≈ {gt.retrain_s:.0f} s")
full_acc = np.mean(outcome(shipped.finetuned, shipped.tokenizer, world.queries)["correct"])
print(f"accuracy of the fine-tuned model: {full_acc:.3f} on the full corpus, "
      f"{gt.correct.double().mean():.3f} on average after half-corpus retraining")
cmp("m at the shipped θ_ft vs the ground truth's m_full", measure(shipped.finetuned, shipped.tokenizer, world.queries),
    gt.m_full, atol=1e-5)

# how many of a question's sources a subset keeps decides a lot: the fact is stated in 3 documents
col = {d: i for i, d in enumerate(gt.doc_ids)}
kept = torch.stack([gt.masks[:, [col[d] for d in q.source_doc_ids]].sum(1) for q in world.queries], 1)  # (M, Q)
fig, ax = plt.subplots(figsize=(6, 3.8))
for k in range(int(kept.max()) + 1):
    sel = kept == k
    ax.scatter(torch.full((int(sel.sum()),), float(k)) + 0.15 * torch.randn(int(sel.sum())), gt.m[sel], s=6, alpha=0.5)
ax.set(xlabel="sources of the fact kept in the subset", ylabel="m(q) = −log p(answer) after retraining",
       yscale="log", title="What the retrains measure")
plt.show()
print("mean m by sources kept:", {k: round(float(gt.m[kept == k].mean()), 2) for k in range(int(kept.max()) + 1)})"""),
    MD("""**The noise ceiling.** For the re-seeded subsets, the Spearman over subsets between the two seeds' m(q) — by hand, per question. An LDS near it means a method predicts retraining as well as retraining predicts itself."""),
    CODE("""K = gt.m_noise.shape[0]
ceiling_q = torch.tensor([spearman(gt.m_noise[:, q], gt.m[:K, q]) for q in range(gt.m.shape[1])])
ceiling, ceiling_sem = float(ceiling_q.mean()), sem(ceiling_q.tolist())
noise_mae = float((gt.m_noise - gt.m[:K]).abs().mean())
print(f"noise ceiling over {K} subsets: {ceiling:.3f} ± {ceiling_sem:.3f}; mean |m_seedA − m_seedB| = {noise_mae:.3f} nats "
      f"(spread of m over subsets: {float(gt.m.std(0).mean()):.2f} nats)")"""),
    MD("""## 4. Every registered method's LDS

The `Attributor` scores every document for every question with every method of the registry (`msif-lite methods`): the multi-stage score and its variants, the single-stage and fine-tune-only baselines, gradient dot product and cosine, BM25 and embeddings (queried with question + answer, the input the gradient methods get; `*_question`: the question alone), and a seeded random score. No candidate pre-selection: a subset's prediction sums over all the documents it keeps."""),
    CODE("""att = Attributor(shipped.pretrained, shipped.finetuned, shipped.tokenizer,
                 [(d.doc_id, d.text) for d in world.documents], [(p.prompt, p.answer) for p in world.finetune_qa],
                 AttributionConfig(cache_dir=".cache/nb10", progress=False), alpha=shipped.alpha)
scores = {name: att.scores(name, world.queries, att.doc_ids) for name in METHODS}
lm_lds = {name: lds(s, gt.masks, gt.m) for name, s in scores.items()}
ranked_methods = sorted(lm_lds, key=lambda n: -float(lm_lds[n].mean()))
print(f"{'method':<24s}{'LDS':>16s}   kind")
for n in ranked_methods:
    kind = "gradient" if isinstance(METHODS[n], GradientMethod) else "text/random"
    print(f"{n:<24s}{lm_lds[n].mean():>9.3f} ± {sem(lm_lds[n].tolist()):.3f}   {kind}")
print(f"{'(noise ceiling)':<24s}{ceiling:>9.3f} ± {ceiling_sem:.3f}")
# a reference, not a method: score 1 for each document that states the fact, 0 otherwise
oracle = torch.zeros(len(world.queries), N_LM, dtype=torch.float64)
for i, q in enumerate(world.queries):
    oracle[i, [col[d] for d in q.source_doc_ids]] = 1.0
oracle_lds = lds(oracle, gt.masks, gt.m)
print(f"{'(true-source indicator)':<24s}{oracle_lds.mean():>9.3f} ± {sem(oracle_lds.tolist()):.3f}")

fig, ax = plt.subplots(figsize=(7, 5))
ax.barh(ranked_methods[::-1], [float(lm_lds[n].mean()) for n in ranked_methods[::-1]],
        xerr=[sem(lm_lds[n].tolist()) for n in ranked_methods[::-1]],
        color=["tab:blue" if isinstance(METHODS[n], GradientMethod) else "tab:orange" for n in ranked_methods[::-1]])
ax.axvline(ceiling, ls="--", c="gray", label="retraining noise ceiling")
ax.axvline(0, c="black", lw=0.8)
ax.set(xlabel="LDS (mean ± sem over questions)", title="Which method predicts re-pre-training + re-fine-tuning?")
ax.legend()
plt.show()"""),
    MD("""## 5. Two questions, side by side

*States the fact*: the MRR of the true sources when each method ranks the whole corpus. *Causes the answer*: the LDS above, and leave-top-k-out — for one question per person, remove each question's top-3 documents by the method, retrain both stages once, and measure how much −log p(answer) rises on those questions ("targets") and on the others. The removal retrains are part of `msif-lite bench lds`; their numbers are read from `results/lds.json` (rerun one live below)."""),
    CODE("""truths = [set(q.source_doc_ids) for q in world.queries]
mrr = {n: mean_reciprocal_rank(s, att.doc_ids, truths) for n, s in scores.items()}  # ties: seeded random order
bench = json.loads(Path("../results/lds.json").read_text())["worlds"]["lds"]
removal = bench["top_k_removal"]
print(f"{'method':<24s}{'MRR (states)':>14s}{'LDS (causes)':>14s}{'Δm targets':>12s}{'Δm others':>11s}")
for n in ranked_methods:
    r = removal.get(n, {})
    print(f"{n:<24s}{mrr[n]:>14.3f}{lm_lds[n].mean():>14.3f}{r.get('dm_targets_mean', float('nan')):>12.2f}"
          f"{r.get('dm_others_mean', float('nan')):>11.2f}")
for n in ("true_sources", "none"):
    print(f"{'(' + n + ')':<24s}{'':>14s}{'':>14s}{removal[n]['dm_targets_mean']:>12.2f}{removal[n]['dm_others_mean']:>11.2f}")
bench_row = cmp("notebook LDS vs results/lds.json (multi_stage)", float(lm_lds["multi_stage"].mean()),
                bench["methods"]["multi_stage"]["lds_mean"], atol=1e-6)
diag = bench["diagnostics"]
print(f"median ‖∇ℓ(z, θ_pt)‖: true sources {diag['grad_norm_true_sources_median']:.1f}, "
      f"other documents {diag['grad_norm_other_docs_median']:.1f}")
print("fraction of each question's top-3 that are its true sources:",
      ", ".join(f"{n} {v:.2f}" for n, v in sorted(diag["true_sources_in_top_k"].items(), key=lambda kv: -kv[1])))

fig, ax = plt.subplots(figsize=(6.5, 4.5))
for n in ranked_methods:
    c = "tab:blue" if isinstance(METHODS[n], GradientMethod) else "tab:orange"
    ax.scatter(mrr[n], float(lm_lds[n].mean()), color=c)
    ax.annotate(n, (mrr[n], float(lm_lds[n].mean())), fontsize=7, xytext=(3, 2), textcoords="offset points")
ax.set(xlabel="fact-tracing MRR (states the fact)", ylabel="LDS (predicts retraining)",
       title="Blue: gradient methods, orange: text and random")
plt.show()"""),
    MD("""## 6. The shipped numbers are reproducible

Retrain a few of the shipped subsets live (same seeds) and compare m with the ground truth; then rerun the multi-stage leave-top-k-out retrain and compare its Δm with `results/lds.json`. Training on the CPU is deterministic, so both should agree to float precision."""),
    CODE("""cfg = RetrainConfig("lds")
live = list(range(pick(3, 1)))
for j in live:
    model = retrain(world, shipped.tokenizer, gt.masks[j].tolist(), cfg, cfg.data_seed)
    repro = cmp(f"subset {j}: m retrained live vs shipped", measure(model, shipped.tokenizer, world.queries), gt.m[j],
                atol=1e-4, rtol=1e-4)

targets, seen = [], set()
for i, q in enumerate(world.queries):  # one question per person, as the benchmark does
    e = world.fact(q.fact_id).entity_id
    if e not in seen and len(targets) < bench["settings"]["removal_targets"]:
        seen.add(e)
        targets.append(i)
k = world.config.docs_per_fact
removed = {att.doc_ids[j] for i in targets for j in scores["multi_stage"][i].argsort(descending=True)[:k]}
model = retrain(world, shipped.tokenizer, [d not in removed for d in att.doc_ids], cfg, cfg.data_seed)
dm = measure(model, shipped.tokenizer, world.queries) - measure(shipped.finetuned, shipped.tokenizer, world.queries)
removal_row = cmp("multi-stage top-k removal: Δm on targets, live vs results/lds.json", float(dm[targets].mean()),
                  removal["multi_stage"]["dm_targets_mean"], atol=1e-3)
print(f"removed {len(removed)} documents; {len(removed & {d for i in targets for d in world.queries[i].source_doc_ids})} "
      f"of them are true sources of the targets")"""),
    MD("""## 7. A world where the cause is not lexically visible

On the `lds` world the documents that state a fact are its only causes *and* contain the question's invented name and the answer verbatim, so text matching is nearly an oracle. The `lds-hard` world was designed (and written down in `docs/design.md` §A world where the cause is not lexically visible) before any method was scored on it, to have what real corpora have: documents of realistic length (three filler sentences each), **indirect sources** (one of each fact's three sources states it about the person's alias, "the keeper of the silver compass", tied to the name only by separate link documents), and **co-occurrence distractors** (the name and the true answer in a sentence that does not state the fact: "X once visited Istrelle on a long journey."). Same model, schedule and α; 356 documents, 52 questions. Its retraining ground truth was made the same way (`msif-lite bench lds --pipeline lds-hard`)."""),
    CODE("""hard = load_shipped("lds-hard")
hard_gt = GroundTruth.load(data_dir() / "lds" / "lds-hard.json", hard.world, hard.tokenizer)
hard_acc = np.mean(outcome(hard.finetuned, hard.tokenizer, hard.world.queries)["correct"])
kinds = {k: sum(d.kind == k for d in hard.world.documents) for k in ("bio", "link", "distractor", "blurb")}
print(f"{len(hard.world.documents)} documents {kinds}; accuracy of the fine-tuned model {hard_acc:.3f}; "
      f"{hard_gt.masks.shape[0]} subsets, {hard_gt.m_noise.shape[0]} re-seeded")
q0 = hard.world.queries[0]
for d in q0.source_doc_ids:
    print("  source:", next(x.text for x in hard.world.documents if x.doc_id == d))

hard_att = Attributor(hard.pretrained, hard.finetuned, hard.tokenizer,
                      [(d.doc_id, d.text) for d in hard.world.documents],
                      [(p.prompt, p.answer) for p in hard.world.finetune_qa],
                      AttributionConfig(cache_dir=".cache/nb10", progress=False), alpha=hard.alpha)
hard_scores = {name: hard_att.scores(name, hard.world.queries, hard_att.doc_ids) for name in METHODS}
hard_lds = {name: lds(s, hard_gt.masks, hard_gt.m) for name, s in hard_scores.items()}
hard_truths = [set(q.source_doc_ids) for q in hard.world.queries]
hard_mrr = {n: mean_reciprocal_rank(s, hard_att.doc_ids, hard_truths) for n, s in hard_scores.items()}
Kh = hard_gt.m_noise.shape[0]
hard_ceiling_q = torch.tensor([spearman(hard_gt.m_noise[:, q], hard_gt.m[:Kh, q]) for q in range(hard_gt.m.shape[1])])
hard_removal = json.loads(Path("../results/lds.json").read_text())["worlds"]["lds-hard"]["top_k_removal"]
print(f"\n{'method':<24s}{'LDS lds':>10s}{'LDS hard':>16s}{'MRR hard':>10s}{'Δm targets hard':>17s}")
for n in sorted(hard_lds, key=lambda n: -float(hard_lds[n].mean())):
    r = hard_removal.get(n, {})
    print(f"{n:<24s}{lm_lds[n].mean():>10.3f}{hard_lds[n].mean():>9.3f} ± {sem(hard_lds[n].tolist()):.3f}"
          f"{hard_mrr[n]:>10.3f}{r.get('dm_targets_mean', float('nan')):>17.2f}")
print(f"{'(noise ceiling)':<24s}{ceiling:>10.3f}{hard_ceiling_q.mean():>9.3f} ± {sem(hard_ceiling_q.tolist()):.3f}")
for n in ("true_sources", "none"):
    print(f"{'(' + n + ')':<24s}{'':>35s}{hard_removal[n]['dm_targets_mean']:>17.2f}")"""),
    MD("""## 8. What the numbers say

SUMMARY_PLACEHOLDER

## Exercises

**Exercise 1 (pen and paper: the datamodel).** Starting from dθ/dε = −H⁻¹∇ℓ(z), show that removing a set R of documents from a training set of N changes m by ≈ (1/N) Σ_{z∈R} I(z, q), and that LDS does not depend on the factor 1/N or on the constant m(all). What would change if the training loss were a *sum* over documents instead of a mean?"""),
    solution("""print("Removing z is ε = −1/N: Δθ ≈ (1/N) H⁻¹∇ℓ(z), Δm ≈ ∇mᵀΔθ = I(z, q)/N; first-order effects add, so\\n"
      "Δm(R) ≈ (1/N) Σ_{z∈R} I(z, q) and m(S) ≈ m(all) + (1/N) Σ_{z∉S} I = c − (1/N) Σ_{z∈S} I.\\n"
      "Spearman is invariant to positive scaling and shifts, so 1/N and c drop out. With a summed loss,\\n"
      "H is N times larger and ε = −1 per document: the same first-order prediction, scaled.")"""),
    MD("""**Exercise 2 (the fraction).** On the convex problem of §2, compute the multi-stage LDS for fractions 0.3, 0.5, 0.7, 0.9 and 0.97 of the data kept. How does it move, and why?"""),
    solution("""for frac in (0.3, 0.5, 0.7, 0.9, 0.97):
    mk = subset_masks(N_PT, 16, frac, seed=1)
    ms_ = torch.stack([task.measurement(two_stage(mk[j].double())[1], (xq, yq)).detach() for j in range(16)])
    print(f"keep {frac:.0%}: multi-stage LDS {lds(I_ms, mk, ms_).mean():.3f}")
print("The closer the subsets are to the full set, the smaller the perturbation and the better the first-order model.")"""),
    MD("""**Exercise 3 (which questions does multi-stage predict worst?).** For the language model, find the question with the lowest multi-stage LDS. How many of its sources does each subset keep, and how does its m vary across subsets compared with the noise between seeds?"""),
    solution("""q = int(lm_lds["multi_stage"].argmin())
print(world.queries[q].prompt.splitlines()[0], "→", world.queries[q].answer, f"LDS {lm_lds['multi_stage'][q]:.3f}")
print("sources kept per subset:", kept[:, q].tolist())
print(f"spread of m over subsets {float(gt.m[:, q].std()):.3f} nats; seed noise {float((gt.m_noise[:, q] - gt.m[:K, q]).abs().mean()):.3f}")"""),
    MD("""## Claims

What this notebook has shown, as checks that run on every execution. Thresholds leave margin below the values measured (stated in §7)."""),
    CODE("""assert hand_row["close"], "the LDS by hand equals msif_lite.eval.metrics.lds"
assert lds_rows[(0.9, "multi-stage")].mean() > 0.9, "exact multi-stage influence predicts exact two-stage retraining (LDS > 0.9, 90% kept)"
assert lds_rows[(0.5, "multi-stage")].mean() > 0.75, "... and still > 0.75 on half-data subsets, where first order is only a model"
assert lds_rows[(0.9, "multi-stage")].mean() > lds_rows[(0.9, "single-stage")].mean() + 0.02, \\
    "near the full set, the fine-tuning stage of the formula helps (multi-stage LDS > single-stage)"
assert abs(lds_rows[(0.5, "random")].mean()) < 0.2, "random scores have LDS ≈ 0"
assert repro["close"] and removal_row["close"], "the shipped retrains reproduce live (CPU training is deterministic)"
assert ceiling > 0.5, "retraining with another data-order seed orders the subsets the same way (noise ceiling > 0.5)"
CLAIMS_PLACEHOLDER"""),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = CELLS
    return nb


if __name__ == "__main__":
    import sys

    summary = Path(sys.argv[1]).read_text() if len(sys.argv) > 1 else "(to be written)"
    claims = Path(sys.argv[2]).read_text() if len(sys.argv) > 2 else ""
    nb = build()
    for c in nb.cells:
        c.source = c.source.replace("SUMMARY_PLACEHOLDER", summary.strip()).replace(
            "CLAIMS_PLACEHOLDER", claims.strip())
    out = Path(__file__).resolve().parents[1] / "notebooks" / "10_counterfactual_evaluation.ipynb"
    nbformat.write(nb, out)
    print(out.name)

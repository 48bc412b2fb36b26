"""Unrolled metagradients as registered methods (DESIGN §6, issue 25): the exact first-order
answer for the training run that happened, and the ablation that says where influence
functions part from it.

Both read the run from the context (`Attributor(..., training_run=TrainingRun(...))`,
`eval.training_run`) and refuse clearly without it.

    unrolled:                I(z_i, q) = −∂m(q; θ_ft(w))/∂w_i at w = 1, through every AdamW
                             step of pre-training and fine-tuning (`eval.unrolled.metagradient`:
                             batch order, clip, schedule, θ_pt(w) as start and anchor).
    unrolled_finetune_only:  I(z, q) = (dm/dθ_pt)ᵀ (H_pt + λ_pt I)⁻¹ ∇ℓ(z, θ_pt), with
                             dm/dθ_pt the *exact* reverse pass through the fine-tune (start
                             and anchor moved together) and the pre-training part replaced by
                             the single-stage influence function at θ_pt (the kit's H_pt
                             factors and λ_pt, tracked layers only, ∇ℓ(z) the document's
                             token-sum gradient). Since dθ_pt/dw_i ≈ −(H_pt)⁻¹∇ℓ_i/n at a
                             minimum of the pre-training objective (n its token normaliser),
                             this is −dm/dw_i up to one positive constant per run, as the
                             influence function sees it.

`multi_stage` is the same formula as `unrolled_finetune_only` with dm/dθ_pt replaced by its
own fine-tuning influence α(H_ft + αI)⁻¹∇m(q, θ_ft). So multi_stage → unrolled_finetune_only
isolates the fine-tuning path (non-convergence of the fine-tune, AdamW, clip), and
unrolled_finetune_only → unrolled the pre-training path (the PBRF question, notebook 01).
Both are first-order in w: removing half a corpus is far from their regime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from msif_lite.attribution.context import ScoringContext
from msif_lite.attribution.encoder import QuestionLike
from msif_lite.attribution.methods import (
    Method,
    ScoreSettings,
    Stage,
    pretrain_preconditioner,
    register,
)
from msif_lite.engine.layers import Grads

REPLAY_RTOL = 0.1  # ‖θ_pt(replay) − θ_pt(context)‖ / ‖θ_pt(context)‖: see `check_replay`


def training_run(ctx: ScoringContext):
    """The context's `TrainingRun`, or a ValueError that says how to give one."""
    run = getattr(ctx, "training_run", None)
    if run is None:
        raise ValueError(
            "the unrolled methods differentiate through the training run itself: pass "
            "Attributor(..., training_run=TrainingRun.from_pipeline(preset, world, tokenizer)) "
            "(msif_lite.eval.training_run; the run that produced the two checkpoints)"
        )
    return run


def check_replay(ctx: ScoringContext, run) -> None:
    """Refuse a run whose replayed θ_pt is not the context's pre-trained model.

    Relative distance over all parameters, tolerance REPLAY_RTOL: on one machine the replay
    is training.py bit-for-bit, but a checkpoint trained elsewhere (other threads, library
    versions) differs by rounding grown over the 600 steps (the shipped `lds` θ_pt by 5e-4
    at most per weight, m within 0.002 nats; `lds-hard` by 0.023 relative), while another
    seed, corpus order or schedule moves θ_pt by O(1) relative (tests)."""
    have = dict(ctx.stage(Stage.PRETRAINED).model.named_parameters())
    diff = ref = 0.0
    for name, p in zip(run.problem.names, run.theta_pt()):
        r = have[name].detach().to(p.device, p.dtype)
        diff, ref = diff + float(((p - r) ** 2).sum()), ref + float((r**2).sum())
    rel = (diff / max(ref, 1e-30)) ** 0.5
    if rel > REPLAY_RTOL:
        raise ValueError(f"the training run does not reproduce the pre-trained model (relative "
                         f"distance {rel:.2g} > {REPLAY_RTOL}): pass the run (initial weights, "
                         "corpus order, TrainConfigs, α) that produced it")  # fmt: skip


@dataclass(frozen=True)
class UnrolledMethod(Method):
    """−dm/dw through both stages (see the module docstring)."""

    def requires(self) -> frozenset[str]:
        return frozenset({"training_run"})

    def scores(self, ctx: ScoringContext, questions: Sequence[QuestionLike],
               doc_ids: Sequence[str], settings: ScoreSettings) -> torch.Tensor:  # fmt: skip
        run = training_run(ctx)
        check_replay(ctx, run)
        cols = run.columns(doc_ids)
        return -run.metagradient(questions)[:, cols].double().cpu()


def adjoint_grads(ctx: ScoringContext, run, questions: Sequence[QuestionLike]) -> Grads:
    """dm/dθ_pt per question on the tracked layers, as (Q, out, in + bias) per layer."""
    adj = run.finetune_adjoints(questions)
    index = {n: j for j, n in enumerate(run.problem.names)}
    out: Grads = {}
    for m in ctx.stage(Stage.PRETRAINED).modules:
        (wname, _), *bias = m.parameters()
        w = torch.stack([a[index[wname]] for a in adj])
        parts = [m.layer_kind.weight_to_matrix(w)]
        if bias:
            parts.append(torch.stack([a[index[bias[0][0]]] for a in adj]).unsqueeze(-1))
        out[m.name] = torch.cat(parts, dim=-1)
    return out


@dataclass(frozen=True)
class UnrolledFinetuneOnlyMethod(Method):
    """(dm/dθ_pt)ᵀ (H_pt + λ_pt I)⁻¹ ∇ℓ(z, θ_pt): exact fine-tune, influence for pre-training."""

    def requires(self) -> frozenset[str]:
        return frozenset({"training_run"})

    def scores(self, ctx, questions, doc_ids, settings):
        run = training_run(ctx)
        check_replay(ctx, run)
        stage = ctx.stage(Stage.PRETRAINED)
        ihvp = pretrain_preconditioner(ctx, settings)
        dtype = torch.float64 if settings.float64 else torch.float32
        g = {k: v.to(dtype) for k, v in adjoint_grads(ctx, run, questions).items()}
        pre = ihvp.apply(g)
        return stage.store().scores(pre, ctx.candidates(doc_ids)).double()


register(UnrolledMethod(
    "unrolled", "Unrolled metagradient (both stages)",
    "−dm(q; θ_ft(w))/dw_i through every AdamW step of pre-training and fine-tuning (needs "
    "Attributor(training_run=...); DESIGN §6)"))
register(UnrolledFinetuneOnlyMethod(
    "unrolled_finetune_only", "Unrolled fine-tune, influence for pre-training",
    "(dm/dθ_pt)ᵀ(H_pt + λ_pt I)⁻¹∇ℓ(z, θ_pt), dm/dθ_pt through every fine-tuning step (needs "
    "Attributor(training_run=...); DESIGN §6)"))

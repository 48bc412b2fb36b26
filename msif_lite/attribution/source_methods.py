"""Influence along the training run: the ablations that say *why* influence misses (issue
25), beside the exact unrolling of `attribution.unrolled_methods`.

    if_checkpoints:  (1/K) Σ_k α ∇m(q, θ_ft)ᵀ (H_ft + αI)⁻¹ (H_k + λ_k I)⁻¹ ∇ℓ(z, θ_k),
                     multi_stage with its pre-training factor taken at K equally spaced
                     pre-training checkpoints θ_k (the ends of K equal segments, the last
                     one θ_pt itself; H_k and the candidate gradients fitted there with the
                     kit's curvature, λ_k the configured damping of each). Averaged, not
                     summed TracIn-style with η_k: each term is already a complete estimate
                     of the same derivative dθ_pt/dw (the response to convergence under the
                     quadratic model at θ_k), not the contribution of one stretch of
                     training, so the terms are alternatives to average; TracIn's η_k-sum
                     adds first-order contributions of successive stretches instead (that
                     additive picture, with curvature, is `source`). K = 1 is multi_stage.
    source:          SOURCE (Bae et al. 2024) across both stages, `eval.source`: K_ft
                     fine-tuning segments carry ∇m(q, θ_ft) back to dm/dθ_pt (transport
                     e^{−T R} plus the anchor's α R), then K pre-training segments score
                     Σ_k (c_{k,z}/T_k) ⟨R_k (transported adjoint), ∇s_z(θ_k)⟩, with
                     R = p(1 − e^{−T r})/r per EK-FAC eigen-direction (r = p(c(Λ + λ) + a)
                     + wd), θ_k the segment's end. AdamW is approximated by one scalar
                     preconditioner p per layer and segment (see `eval.source`).

Both read the run from the context (`Attributor(..., training_run=TrainingRun(...))`) and
replay it to the checkpoints (`eval.training_run`: the pre-training trajectory the unrolled
methods share; a fine-tuning replay from θ_pt), fitting the configured curvature and the
candidate gradients at each checkpoint (`StageState`: cached on disk by weights). The
checkpoints, their stages and the document weights are kept in memory per context.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Literal

import torch

from msif_lite.attribution.context import ScoringContext
from msif_lite.attribution.methods import Method, Stage, register
from msif_lite.attribution.stage import StageState
from msif_lite.attribution.unrolled_methods import check_replay, training_run
from msif_lite.engine.multistage import MultiStageConfig, MultiStageIHVP
from msif_lite.engine.tasks import IGNORE_INDEX
from msif_lite.eval.source import (
    SegmentOperator,
    SegmentStates,
    document_weights,
    finetune_adjoint,
    pretrain_scores,
    segment_bounds,
    segments_from_trajectory,
)
from msif_lite.eval.unrolled import batch_order, default_checkpoint_every, run_stage
from msif_lite.world.training import encode_documents, lr_at


class _RunCheckpoints:
    """Per context: the replayed segments of each stage, the StageStates at their ends and
    the pre-training document weights, each built once."""

    def __init__(self, ctx: ScoringContext, run):
        self.ctx, self.run = ctx, run
        self._segments: dict[tuple[Stage, int], SegmentStates] = {}
        self._stages: dict[tuple[Stage, int, int], StageState] = {}
        self._weights: dict[int, tuple[torch.Tensor, float]] = {}
        self._ft_traj = None

    def layers(self) -> dict[str, list[int]]:
        index = {n: j for j, n in enumerate(self.run.problem.names)}
        return {m.name: [index[n] for n, _ in m.parameters()]
                for m in self.ctx.stage(Stage.PRETRAINED).modules}  # fmt: skip

    def segments(self, which: Stage, k: int) -> SegmentStates:
        """K segments of a stage: θ at their ends, lrs and preconditioners."""
        if (which, k) not in self._segments:
            problem = self.run.problem
            if which is Stage.PRETRAINED:
                got = segments_from_trajectory(problem.pretrain, self.run.pretrain_trajectory(),
                                               k, self.layers(), w=problem.ones())  # fmt: skip
            else:
                theta_pt = self.run.theta_pt()
                if self._ft_traj is None:
                    every = default_checkpoint_every(problem.finetune.cfg.steps)
                    self._ft_traj = run_stage(problem.finetune, theta_pt, anchor=theta_pt,
                                              checkpoint_every=every)  # fmt: skip
                got = segments_from_trajectory(problem.finetune, self._ft_traj, k,
                                               self.layers(), anchor=theta_pt)  # fmt: skip
            self._segments[(which, k)] = got
        return self._segments[(which, k)]

    def stages(self, which: Stage, k: int) -> list[StageState]:
        """The StageState at each segment's end; the last is the context's own stage."""
        ends = self.segments(which, k).ends
        out = []
        for j, theta in enumerate(ends):
            if j == len(ends) - 1:
                out.append(self.ctx.stage(which))
                continue
            if (which, k, j) not in self._stages:
                self._stages[(which, k, j)] = self._stage_at(which, theta)
            out.append(self._stages[(which, k, j)])
        return out

    def _stage_at(self, which: Stage, theta) -> StageState:
        base = self.ctx.stage(which)
        model = copy.deepcopy(base.model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in zip(self.run.problem.names, theta):
                params[name].copy_(p.to(params[name].device, params[name].dtype))
        return base.with_model(model.eval())

    def weights(self, k: int) -> tuple[torch.Tensor, float]:
        """(K, N) c_{k,z}/T_k over the run's documents, and τ̄ (mean target tokens)."""
        if k not in self._weights:
            run, cfg = self.run, self.run.pretrain_cfg
            tokens = [sum(lab != IGNORE_INDEX for lab in labels[1:])
                      for _, labels in encode_documents(run.tokenizer, run.texts)]  # fmt: skip
            lrs = [lr_at(t, cfg) for t in range(cfg.steps)]
            w = document_weights(batch_order(len(tokens), cfg), tokens, lrs,
                                 segment_bounds(cfg.steps, k))  # fmt: skip
            self._weights[k] = (w, sum(tokens) / len(tokens))
        return self._weights[k]


_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoints_of(ctx: ScoringContext) -> _RunCheckpoints:
    """The context's checkpoint memo (refused without a training run that made θ_pt)."""
    run = training_run(ctx)
    check_replay(ctx, run)
    try:
        memo = _MEMO.get(ctx)
        if memo is None or memo.run is not run:
            memo = _MEMO[ctx] = _RunCheckpoints(ctx, run)
        return memo
    except TypeError:  # a context that cannot be weakly referenced: no memo
        return _RunCheckpoints(ctx, run)


def _factors(stage: StageState):
    f = stage.factors
    if f is None or not hasattr(f.layers[0], "q_s"):
        raise ValueError(f"source needs an eigenbasis curvature (AttributionConfig.curvature "
                         f"'ekfac' or 'kfac'), not {stage.config.curvature!r}")  # fmt: skip
    return f


@dataclass(frozen=True)
class IFCheckpointsMethod(Method):
    """Multi-stage influence with the pre-training factor averaged over K checkpoints."""

    checkpoints: int = 4

    def requires(self) -> frozenset[str]:
        return frozenset({"training_run"})

    def scores(self, ctx, questions, doc_ids, settings):
        memo = checkpoints_of(ctx)
        ft, cands = ctx.stage(Stage.FINETUNED), ctx.candidates(doc_ids)
        cfg = MultiStageConfig(settings.alpha, settings.pretrain_damping, settings.include_alpha)
        total = None
        for st in memo.stages(Stage.PRETRAINED, self.checkpoints):
            def inverse(stage, damping, st=st):
                return (ft if stage == "finetuned" else st).inverse(damping, settings.float64)

            pre = ft.preconditioned(questions, MultiStageIHVP.compose(inverse, cfg))
            s = st.store().scores(pre, cands, by_module=True).double().sum(-1)
            total = s if total is None else total + s
        return total / self.checkpoints


@dataclass(frozen=True)
class SourceMethod(Method):
    """SOURCE across both stages (`eval.source`); `mode` "exp" (SOURCE) or "steps" (the
    exact discrete products), `time_scale` multiplies every η (the T → ∞ checks)."""

    segments: int = 4
    finetune_segments: int = 2
    mode: Literal["exp", "steps"] = "exp"
    time_scale: float = 1.0

    def requires(self) -> frozenset[str]:
        return frozenset({"training_run"})

    def operators(self, ctx, settings) -> tuple[list, list]:
        """The fine-tuning and pre-training segments' operators (forward order)."""
        memo = checkpoints_of(ctx)
        kw = dict(mode=self.mode, time_scale=self.time_scale)
        ft = [SegmentOperator(_factors(st), seg, scale=st.objective_scale,
                              shift=settings.alpha, **kw)
              for st, seg in zip(memo.stages(Stage.FINETUNED, self.finetune_segments),
                                 memo.segments(Stage.FINETUNED, self.finetune_segments).segments)]
        _, tau = memo.weights(self.segments)
        pt = [SegmentOperator(_factors(st), seg, scale=1.0 / tau,
                              damping=settings.pretrain_damping, **kw)
              for st, seg in zip(memo.stages(Stage.PRETRAINED, self.segments),
                                 memo.segments(Stage.PRETRAINED, self.segments).segments)]
        return ft, pt  # fmt: skip

    def scores(self, ctx, questions, doc_ids, settings):
        memo = checkpoints_of(ctx)
        ft_ops, pt_ops = self.operators(ctx, settings)
        adjoint = finetune_adjoint(ft_ops, ctx.stage(Stage.FINETUNED).query_grads(questions),
                                   settings.alpha)  # fmt: skip
        cands, stages = ctx.candidates(doc_ids), memo.stages(Stage.PRETRAINED, self.segments)
        weights = memo.weights(self.segments)[0][:, memo.run.columns(doc_ids)]

        def score(k: int, v):
            return stages[k].store().scores(v, cands).double() * weights[k]

        return pretrain_scores(pt_ops, adjoint, score)


register(IFCheckpointsMethod(
    "if_checkpoints", "Multi-stage influence averaged over pre-training checkpoints",
    "(1/K)Σ_k α∇m(q, θ_ft)ᵀ(H_ft + αI)⁻¹(H_k + λI)⁻¹∇ℓ(z, θ_k) at K = 4 equally spaced "
    "pre-training checkpoints (needs Attributor(training_run=...); issue 25)"))
register(SourceMethod(
    "source", "SOURCE: approximate unrolling in segments (both stages)",
    "Σ_k (c_k,z/T_k)⟨R_k E⋯ dm/dθ_pt, ∇ℓ(z, θ_k)⟩, R = (1 − e^{−T H})H⁻¹ per EK-FAC "
    "direction, 4 pre-training + 2 fine-tuning segments (needs Attributor(training_run=...); "
    "Bae et al. 2024)"))

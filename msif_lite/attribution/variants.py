"""Variants of the multi-stage score measured against retraining (Notebook 11).

A transformer applies each weight matrix W at every position t of a document, so its
gradient is a sum over positions, and so is the score
(Notebook 06 §Which tokens carry the score?):

    ∇_W ℓ(z) = Σ_t Ds_t ā_tᵀ,    I(z, q) = Σ_t I_t,    I_t = Σ_l Ds_{t,l}ᵀ P_l ā_{t,l}

(Ds_t = ∂ℓ(z)/∂s_t, the output gradient at position t, ā_t the layer input there). Notebook
11 §Which positions carry a score finds I(z, q) dominated by a few positions with large,
unpredictable losses (the word that follows an invented name) whose sign has nothing to do
with the fact, while the answer position of a true source carries a clear positive term.
The position-level variants below change how the terms are summed; the after-mention
variant changes the candidate loss; TracIn replaces θ_pt and the curvature by a sum over
pre-training checkpoints.

    unit:           Σ_t I_t / ‖Ds_t ā_tᵀ‖             (each position's gradient at unit length)
    unit_positive:  Σ_t max(0, I_t / ‖Ds_t ā_tᵀ‖)     (only positions that help the answer)
    after_mention:  I(z, q) with ℓ(z) = Σ_{u after the first mention of z's entity} ℓ_u
    TracIn:         Σ_c η_c ∇m(q, θ_c) · ∇ℓ(z, θ_c)   (Pruthi et al. 2020)

Only `after_mention` is linear in a document's gradient, and it needs other candidate
gradients, so the explorer treats all of them like the text methods (whole-document
scores, no per-token split).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

import torch
from tqdm.auto import tqdm

from msif_lite.attribution.context import ScoringContext
from msif_lite.attribution.encoder import QuestionLike
from msif_lite.attribution.methods import (
    GradientMethod,
    Method,
    ScoreSettings,
    get_method,
    register,
)
from msif_lite.engine.capture import BatchCapture, capture_batch
from msif_lite.engine.gradstore import Candidate
from msif_lite.engine.tasks import IGNORE_INDEX


class TokenSum(str, Enum):
    """How a position-level method sums a document's per-position terms I_t."""

    ALL = "all"  # Σ_t I_t: the document's score (the base method)
    UNIT = "unit"  # Σ_t I_t / ‖Ds_t ā_tᵀ‖
    UNIT_POSITIVE = "unit_positive"  # Σ_t max(0, I_t / ‖Ds_t ā_tᵀ‖)
    AFTER_MENTION = "after_mention"  # Σ_t I_t of the loss on the tokens after the mention


def decoded_token_spans(tokenizer, input_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text and each token's (start, end) character span in it."""
    spans, text = [], ""
    for i in input_ids:
        start = len(text)
        text += tokenizer.decode([i])
        spans.append((start, len(text)))
    return text, spans


def after_first_mention(tokenizer, input_ids: Sequence[int], mention: str) -> torch.Tensor:
    """(T,) bool: positions t whose predicted token x_{t+1} starts after the first mention
    of `mention` in the decoded text ends (all True when it does not occur)."""
    text, spans = decoded_token_spans(tokenizer, input_ids)
    ends = [e for _, e in spans]
    start = text.find(mention)
    keep = torch.ones(len(input_ids), dtype=torch.bool)
    if start < 0:
        return keep
    last = next(t for t, e in enumerate(ends) if e >= start + len(mention))
    keep[:last] = False  # position t predicts x_{t+1}; x_{last+1} is the first token after
    return keep


def after_mention_candidate(tokenizer, cand: Candidate, mention: str) -> Candidate:
    """The candidate with its loss on the tokens after the first mention only (labels −100
    up to the mention's last token); unchanged when the mention does not occur."""
    keep = after_first_mention(tokenizer, cand.input_ids, mention).tolist()
    labels = [lab if u > 0 and keep[u - 1] else IGNORE_INDEX for u, lab in enumerate(cand.labels)]
    return replace(cand, labels=tuple(labels))


@dataclass(frozen=True)
class TokenMethod(Method):
    """Σ_t w(I_t) over a document's positions, I_t the per-position terms of the `base`
    gradient method (its query gradients, preconditioner, layers and stages)."""

    base: str = "multi_stage"
    tokens: TokenSum = TokenSum.UNIT

    def scores(self, ctx: ScoringContext, questions: Sequence[QuestionLike],
               doc_ids: Sequence[str], settings: ScoreSettings) -> torch.Tensor:  # fmt: skip
        base = get_method(self.base)
        if not isinstance(base, GradientMethod):
            raise ValueError(f"TokenMethod.base={self.base!r} is not a gradient method")
        pre = base.preconditioned(ctx, questions, settings)
        weights = base.layer_mask(ctx).tolist()
        stage = ctx.stage(base.candidates_at)
        modules, b = stage.modules, ctx.encoder.batch_size
        dtype = pre[modules[0].name].dtype
        out = []
        for i in tqdm(range(0, len(doc_ids), b), desc=f"{self.name} (per-token scores)",
                      disable=not stage.config.progress, delay=2.0):  # fmt: skip
            cands = self.candidates(ctx, doc_ids[i : i + b])
            cap = capture_batch(stage.model, stage.task, ctx.encoder.collate(cands), modules,
                                dtype=dtype)  # fmt: skip
            terms = sum(w * x.token_scores(pre[m.name])
                        for m, x, w in zip(modules, cap.layers, weights) if w)  # fmt: skip
            out.append(self.combine(cap, terms.double(), weights))
        return torch.cat(out, 1)

    def requires(self) -> frozenset[str]:
        return frozenset({"mentions"} if self.tokens is TokenSum.AFTER_MENTION else ())

    def candidates(self, ctx: ScoringContext, doc_ids: Sequence[str]) -> list[Candidate]:
        cands = ctx.candidates(doc_ids)
        if self.tokens is not TokenSum.AFTER_MENTION:
            return cands
        if not ctx.mentions:
            raise ValueError(
                "the after_mention variant needs Attributor(..., mentions={doc_id: entity "
                "name}) (for the kit's world: World.document_mentions()); a document absent "
                "from the mapping keeps its whole loss"
            )
        tok = ctx.encoder.tokenizer
        return [after_mention_candidate(tok, c, ctx.mentions.get(c.doc_id, "\0"))
                for c in cands]  # fmt: skip

    def combine(self, cap: BatchCapture, terms: torch.Tensor,
                weights: Sequence[float]) -> torch.Tensor:  # fmt: skip
        """(Q, B, T) per-position terms → (Q, B) document scores."""
        return position_terms(self.tokens, cap, terms, weights).sum(-1)


def position_terms(tokens: TokenSum, cap: BatchCapture, terms: torch.Tensor,
                   weights: Sequence[float]) -> torch.Tensor:  # fmt: skip
    """(Q, B, T) per-position terms I_t as `tokens` sums them: divided by the position's
    gradient length ‖∇ℓ_t‖ (UNIT, UNIT_POSITIVE), clamped at 0 (UNIT_POSITIVE), padding 0.
    The one place the variants' terms are formed (`TokenMethod.combine`, the trace's evidence)."""
    if tokens in (TokenSum.UNIT, TokenSum.UNIT_POSITIVE):
        sq = sum(w * x.token_grad_sq_norms() for x, w in zip(cap.layers, weights) if w)
        terms = terms / sq.double().sqrt().clamp_min(1e-30)
    if tokens is TokenSum.UNIT_POSITIVE:
        terms = terms.clamp_min(0.0)
    return terms.masked_fill(~cap.mask, 0.0)


@dataclass(frozen=True)
class TracInMethod(Method):
    """TracIn over pre-training checkpoints: Σ_c η_c ∇m(q, θ_c) · ∇ℓ(z, θ_c), the learning
    rate η_c of the step each checkpoint was kept at (Pruthi et al. 2020; with AdamW the
    products are not the optimiser's actual steps)."""

    def requires(self) -> frozenset[str]:
        return frozenset({"checkpoints"})

    def scores(self, ctx, questions, doc_ids, settings):
        if not ctx.checkpoints:
            raise ValueError(
                "TracIn needs pre-training checkpoints: pass Attributor(..., checkpoints=...) "
                "from msif_lite.eval.retraining.pretrain_checkpoints (or TrainConfig("
                "checkpoint_every=...) when pre-training)"
            )
        total = None
        for ck in ctx.checkpoints:
            stage = ctx.checkpoint_stage(ck)
            s = stage.store().scores(stage.query_grads(questions), ctx.candidates(doc_ids))
            total = ck.lr * s.double() if total is None else total + ck.lr * s.double()
        return total


register(TokenMethod(
    "multi_stage_token_unit", "Multi-stage, per-position unit gradients",
    "Σ_t I_t/‖Ds_t ā_tᵀ‖: the multi-stage score with each position's candidate gradient at "
    "unit length (Notebook 11)", "multi_stage", TokenSum.UNIT))
register(TokenMethod(
    "multi_stage_token_positive", "Multi-stage, helpful positions (unit)",
    "Σ_t max(0, I_t/‖Ds_t ā_tᵀ‖): only the positions whose unit gradient helps the "
    "answer (Notebook 11)", "multi_stage", TokenSum.UNIT_POSITIVE))
register(TokenMethod(
    "multi_stage_after_mention", "Multi-stage, loss after the first mention",
    "the multi-stage score with the candidate loss on the tokens after the document's first "
    "mention of its entity (needs Attributor(mentions=...))", "multi_stage",
    TokenSum.AFTER_MENTION))
register(TracInMethod(
    "tracin", "TracIn (pre-training checkpoints)",
    "Σ_c η_c ∇m(q, θ_c)·∇ℓ(z, θ_c) over pre-training checkpoints (needs "
    "Attributor(checkpoints=...); Pruthi et al. 2020)"))

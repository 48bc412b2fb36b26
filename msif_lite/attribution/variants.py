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
from typing import TYPE_CHECKING

import torch

from msif_lite.attribution.methods import (
    GradientMethod,
    Method,
    ScoreSettings,
    get_method,
    register,
)
from msif_lite.engine.capture import BatchCapture, capture_batch
from msif_lite.engine.gradstore import Candidate
from msif_lite.engine.layers import find_modules
from msif_lite.engine.tasks import IGNORE_INDEX

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.attribution.attributor import Attributor, QuestionLike


class TokenSum(str, Enum):
    """How a position-level method sums a document's per-position terms I_t."""

    ALL = "all"  # Σ_t I_t: the document's score (the base method)
    UNIT = "unit"  # Σ_t I_t / ‖Ds_t ā_tᵀ‖
    UNIT_POSITIVE = "unit_positive"  # Σ_t max(0, I_t / ‖Ds_t ā_tᵀ‖)
    AFTER_MENTION = "after_mention"  # Σ_t I_t of the loss on the tokens after the mention


def token_spans(tokenizer, input_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
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
    text, spans = token_spans(tokenizer, input_ids)
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

    def scores(self, att: Attributor, questions: Sequence[QuestionLike],
               doc_ids: Sequence[str], settings: ScoreSettings) -> torch.Tensor:  # fmt: skip
        base = get_method(self.base)
        if not isinstance(base, GradientMethod):
            raise ValueError(f"TokenMethod.base={self.base!r} is not a gradient method")
        pre = base.preconditioned(att, questions, settings)
        weights = base.layer_mask(att).tolist()
        stage = base.candidates_at
        model, modules = att.stage_model(stage), att.stage_modules(stage)
        dtype = pre[modules[0].name].dtype
        out = []
        for i in range(0, len(doc_ids), att.config.batch_size):
            cands = self.candidates(att, doc_ids[i : i + att.config.batch_size])
            cap = capture_batch(model, att.task, att.collate(cands), modules, dtype=dtype)
            terms = sum(w * x.token_scores(pre[m.name])
                        for m, x, w in zip(modules, cap.layers, weights) if w)  # fmt: skip
            out.append(self.combine(cap, terms.double(), weights))
        return torch.cat(out, 1)

    def requires(self) -> frozenset[str]:
        return frozenset({"mentions"} if self.tokens is TokenSum.AFTER_MENTION else ())

    def candidates(self, att: Attributor, doc_ids: Sequence[str]) -> list[Candidate]:
        cands = att.candidates(doc_ids)
        if self.tokens is not TokenSum.AFTER_MENTION:
            return cands
        if not att.mentions:
            raise ValueError(
                "the after_mention variant needs Attributor(..., mentions={doc_id: entity "
                "name}) (for the kit's world: World.document_mentions()); a document absent "
                "from the mapping keeps its whole loss"
            )
        return [after_mention_candidate(att.tokenizer, c, att.mentions.get(c.doc_id, "\0"))
                for c in cands]  # fmt: skip

    def combine(self, cap: BatchCapture, terms: torch.Tensor,
                weights: Sequence[float]) -> torch.Tensor:  # fmt: skip
        """(Q, B, T) per-position terms → (Q, B) document scores."""
        if self.tokens in (TokenSum.UNIT, TokenSum.UNIT_POSITIVE):
            sq = sum(w * x.token_grad_sq_norms() for x, w in zip(cap.layers, weights) if w)
            terms = terms / sq.double().sqrt().clamp_min(1e-30)
        if self.tokens is TokenSum.UNIT_POSITIVE:
            terms = terms.clamp_min(0.0)
        return terms.masked_fill(~cap.mask, 0.0).sum(-1)


@dataclass(frozen=True)
class TracInMethod(Method):
    """TracIn over pre-training checkpoints: Σ_c η_c ∇m(q, θ_c) · ∇ℓ(z, θ_c), the learning
    rate η_c of the step each checkpoint was kept at (Pruthi et al. 2020; with AdamW the
    products are not the optimiser's actual steps)."""

    def requires(self) -> frozenset[str]:
        return frozenset({"checkpoints"})

    def scores(self, att, questions, doc_ids, settings):
        if not att.checkpoints:
            raise ValueError(
                "TracIn needs pre-training checkpoints: pass Attributor(..., checkpoints=...) "
                "from msif_lite.eval.retraining.pretrain_checkpoints (or TrainConfig("
                "checkpoint_every=...) when pre-training)"
            )
        fc, total = att.config.factors, None
        for ck in att.checkpoints:
            model = att.checkpoint_model(ck)
            modules = find_modules(model, fc.include, fc.exclude)
            qg = att.query_grads_of(model, modules, questions)
            s = att.gradient_store(model, modules).scores(qg, att.candidates(doc_ids)).double()
            total = ck.lr * s if total is None else total + ck.lr * s
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

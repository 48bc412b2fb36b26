"""The attribution-method registry: every method the kit compares is one object here.

Notebook 06 derives single-stage influence, notebook 07 the multi-stage score and its
baselines, notebook 10 the variants measured against retraining. A gradient method scores

    I(z, q) = s(q, z) · Σ_{l ∈ layers} ⟨P_l ∇m(q, θ_query), ∇ℓ(z, θ_candidates)_l⟩

(positive = z helps q; m = −log p(answer | prompt)), and is fully described by where its
query and candidate gradients are taken, its preconditioner P, which layers it sums and its
normalisation s. A text method scores the query text against the document text.

Methods depend on `attribution.context.ScoringContext` (not on the Attributor) and turn
per-layer dot products into scores with `attribution.scoring.finish`, the one place the
score is written. Adding a method is one `register(...)` call (in this file, in a module
listed in `msif_lite/attribution/__init__.py`, or in your own module) plus its test:
`Attributor.scores`, the explorer, `msif-lite trace --method` and every benchmark iterate
`METHODS`. `multi_stage_cosine` below was added that way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from msif_lite.attribution import scoring
from msif_lite.attribution.context import ScoringContext
from msif_lite.attribution.encoder import QuestionLike
from msif_lite.attribution.settings import (
    ALPHA_MIN,
    Normalise,
    ScoreSettings,
    Stage,
    TextQuery,
)
from msif_lite.engine.ihvp import InverseHVP
from msif_lite.engine.layers import Grads
from msif_lite.engine.lowrank import LowRankGrads
from msif_lite.engine.multistage import MultiStageConfig, MultiStageIHVP
from msif_lite.engine.prompts import retrieval_text
from msif_lite.registry import Registry

__all__ = ["ALPHA_MIN", "METHODS", "GradientMethod", "Method", "Normalise", "RandomMethod",
           "ScoreSettings", "Stage", "TextMethod", "TextQuery", "get_method", "register"]


# ---------------------------------------------------------------------------- preconditioners
def multi_stage_preconditioner(ctx: ScoringContext, s: ScoreSettings) -> InverseHVP:
    """c · (H_pt + λ_pt I)⁻¹ (H_ft + αI)⁻¹ (notebook 07 §The multi-stage formula)."""
    return MultiStageIHVP.compose(
        lambda stage, damping: ctx.stage(Stage(stage)).inverse(damping, s.float64),
        MultiStageConfig(s.alpha, s.pretrain_damping, s.include_alpha))


def pretrain_preconditioner(ctx: ScoringContext, s: ScoreSettings) -> InverseHVP:
    """(H_pt + λ_pt I)⁻¹: single-stage influence, and multi-stage as α → ∞."""
    return ctx.stage(Stage.PRETRAINED).inverse(s.pretrain_damping, s.float64)


def finetune_preconditioner(ctx: ScoringContext, s: ScoreSettings) -> InverseHVP:
    """(H_ft + λ_ft I)⁻¹ from the fine-tuning data."""
    return ctx.stage(Stage.FINETUNED).inverse(s.finetune_damping, s.float64)


# ---------------------------------------------------------------------------- method kinds
@dataclass(frozen=True)
class Method:
    """The registry's contract: a name, a label, and a way to score documents."""

    name: str
    label: str
    description: str

    def scores(self, ctx: ScoringContext, questions: Sequence[QuestionLike],
               doc_ids: Sequence[str], settings: ScoreSettings) -> torch.Tensor:  # fmt: skip
        """(Q, N) float64 scores, higher = more helpful to the answer."""
        raise NotImplementedError

    def requires(self) -> frozenset[str]:
        """Inputs beyond the two models and the corpus that this method reads from the
        context ("checkpoints", "mentions", "whitening"); see `Attributor.provides`."""
        return frozenset()


@dataclass(frozen=True)
class GradientMethod(Method):
    """I(z, q) = s(q, z) Σ_{l ∈ layers} ⟨P_l ∇m(q, θ_query), ∇ℓ(z, θ_candidates)_l⟩."""

    query_at: Stage = Stage.FINETUNED
    candidates_at: Stage = Stage.PRETRAINED
    preconditioner: Callable[[ScoringContext, ScoreSettings], InverseHVP] | None = None
    damped_stage: Stage | None = None  # the stage whose damping the method exposes
    uses_alpha: bool = False
    normalise: Normalise = Normalise.NONE
    layer_group: str | None = None  # e.g. "mlp": sum only those layers' part of the score
    # the score is ⟨P∇m, ∇ℓ(z)⟩ over the dense stored candidate gradients, so the explorer
    # and the benchmarks may compute the per-layer dots from their own cached gradients
    dense_dot: ClassVar[bool] = True

    def preconditioned(self, ctx: ScoringContext, questions: Sequence[QuestionLike],
                       settings: ScoreSettings, rank: int | None = None
                       ) -> Grads | LowRankGrads:  # fmt: skip
        """P ∇m(q) per question, one layer at a time (`StageState.preconditioned`: the
        preconditioner is block-diagonal over layers, multi-stage applies both stages per
        layer), so the dense query gradients of all layers never coexist. With `rank`, a
        `LowRankGrads` (each layer truncated as soon as it is preconditioned)."""
        ihvp = None if self.preconditioner is None else self.preconditioner(ctx, settings)
        return ctx.stage(self.query_at).preconditioned(questions, ihvp, rank)

    def layer_mask(self, ctx: ScoringContext) -> torch.Tensor:
        """(L,) float64 w_l: 1.0 for the layers this method sums, 0.0 for the others."""
        groups = [m.group for m in ctx.stage(self.candidates_at).modules]
        if self.layer_group is None:
            return torch.ones(len(groups), dtype=torch.float64)
        return torch.tensor([g == self.layer_group for g in groups], dtype=torch.float64)

    def raw_layer_scores(self, ctx: ScoringContext, questions: Sequence[QuestionLike],
                         doc_ids: Sequence[str], settings: ScoreSettings,
                         rank: int | None = None) -> torch.Tensor:  # fmt: skip
        """(Q, N, L) ⟨P_l∇m, ∇ℓ_l⟩ from the candidate stage's gradient store."""
        pre = self.preconditioned(ctx, questions, settings, rank)
        store = ctx.stage(self.candidates_at).store()
        return store.scores(pre, ctx.candidates(doc_ids), by_module=True)

    def layer_scores(self, ctx: ScoringContext, questions: Sequence[QuestionLike],
                     doc_ids: Sequence[str], settings: ScoreSettings,
                     rank: int | None = None) -> torch.Tensor:  # fmt: skip
        """(Q, N, L) per-layer contributions, normalised and masked (`scoring.finish`)."""
        raw = self.raw_layer_scores(ctx, questions, doc_ids, settings, rank)
        return scoring.finish(self, ctx, questions, doc_ids, settings, raw)

    def scores(self, ctx, questions, doc_ids, settings):
        return self.layer_scores(ctx, questions, doc_ids, settings).sum(-1)


@dataclass(frozen=True)
class TextMethod(Method):
    """Text similarity of the query text and the document (no model gradients)."""

    index: str = "bm25"  # "bm25" or "embedding" (Attributor.text_index)
    query: TextQuery = TextQuery.QUESTION_ANSWER

    def query_text(self, q: QuestionLike) -> str:
        answer = q.answer if self.query is TextQuery.QUESTION_ANSWER else None
        return retrieval_text(q.prompt, answer)

    def scores(self, ctx, questions, doc_ids, settings):
        index = ctx.text_index(self.index)
        rows = [index.scores(self.query_text(q), list(doc_ids)) for q in questions]
        return torch.from_numpy(np.stack(rows).astype(np.float64))


@dataclass(frozen=True)
class RandomMethod(Method):
    """A seeded random score per (question, document): the floor every method must beat."""

    seed: int = 0

    def scores(self, ctx, questions, doc_ids, settings):
        def u(q, d) -> float:
            h = hashlib.sha256(f"{self.seed}|{q.prompt}|{q.answer}|{d}".encode()).digest()
            return int.from_bytes(h[:8], "little") / 2**64

        return torch.tensor([[u(q, d) for d in doc_ids] for q in questions], dtype=torch.float64)


# ---------------------------------------------------------------------------- the registry
# the methods of this file, then those that `projected` and `variants` register (read on
# first use of the registry: explicit order, no import circle)
METHODS: Registry[Method] = Registry(
    "method", "method= (or --method)",
    discover=("msif_lite.attribution.projected", "msif_lite.attribution.variants",
              "msif_lite.attribution.unrolled_methods", "msif_lite.attribution.source_methods"))


def register(method: Method) -> Method:
    """Add a method (its name must be new); returns it."""
    return METHODS.register(method)


def get_method(name: str) -> Method:
    """The registered method called `name`; a clear error lists the others."""
    return METHODS.lookup(name)


def available(ctx: ScoringContext) -> list[str]:
    """The registered methods this context has every input for (benchmarks, explorer)."""
    return [n for n, m in METHODS.items() if m.requires() <= ctx.provides]


def gradient_methods() -> list[str]:
    return [n for n, m in METHODS.items() if isinstance(m, GradientMethod)]


def text_methods() -> list[str]:
    return [n for n, m in METHODS.items() if isinstance(m, TextMethod)]


FT, PT = Stage.FINETUNED, Stage.PRETRAINED
register(GradientMethod(
    "multi_stage", "Multi-stage influence",
    "α ∇m(q, θ_ft)ᵀ (H_ft + αI)⁻¹ (H_pt + λ_pt I)⁻¹ ∇ℓ(z, θ_pt) = −dm/dε (notebook 07)",
    FT, PT, multi_stage_preconditioner, damped_stage=PT, uses_alpha=True))
register(GradientMethod(
    "single_stage", "Single-stage influence (θ_pt)",
    "∇m(q, θ_pt)ᵀ (H_pt + λ_pt I)⁻¹ ∇ℓ(z, θ_pt): ignores fine-tuning (notebook 06)",
    PT, PT, pretrain_preconditioner, damped_stage=PT))
register(GradientMethod(
    "finetune_only", "Fine-tune-only influence (θ_ft)",
    "∇m(q, θ_ft)ᵀ (H_ft + λ_ft I)⁻¹ ∇ℓ(z, θ_ft): the fine-tuning curvature only",
    FT, FT, finetune_preconditioner, damped_stage=FT))
register(GradientMethod(
    "grad_dot", "Gradient dot product",
    "∇m(q, θ_ft) · ∇ℓ(z, θ_pt): the multi-stage gradients without curvature", FT, PT))
register(GradientMethod(
    "grad_cosine", "Gradient cosine",
    "∇m(q, θ_ft) · ∇ℓ(z, θ_pt) / (‖∇m‖‖∇ℓ‖)", FT, PT, normalise=Normalise.UNIT))
register(GradientMethod(
    "multi_stage_cosine", "Multi-stage, unit-normalised gradients",
    "the multi-stage score / (‖∇m(q, θ_ft)‖‖∇ℓ(z, θ_pt)‖) (TrackStar's unit norm; Chang et "
    "al. 2024)", FT, PT, multi_stage_preconditioner, damped_stage=PT, uses_alpha=True,
    normalise=Normalise.UNIT))
register(GradientMethod(
    "multi_stage_mlp", "Multi-stage, MLP layers only",
    "the MLP layers' part of the multi-stage score (exact for block-diagonal curvature)",
    FT, PT, multi_stage_preconditioner, damped_stage=PT, uses_alpha=True, layer_group="mlp"))
register(GradientMethod(
    "multi_stage_alpha_inf", "Multi-stage as α → ∞",
    "∇m(q, θ_ft)ᵀ (H_pt + λ_pt I)⁻¹ ∇ℓ(z, θ_pt): α(H_ft + αI)⁻¹ → I, isolates what the "
    "fine-tuning curvature adds", FT, PT, pretrain_preconditioner, damped_stage=PT))
register(GradientMethod(
    "multi_stage_relatif", "Multi-stage, self-influence normalised (RelatIF)",
    "the multi-stage score / √(∇ℓ(z)ᵀ (H_pt + λ_pt I)⁻¹ ∇ℓ(z)) (RelatIF; Barshan et al. 2020)",
    FT, PT, multi_stage_preconditioner, damped_stage=PT, uses_alpha=True,
    normalise=Normalise.SELF_INFLUENCE))
register(TextMethod("bm25", "BM25 (question + answer)",
                    "BM25 (bm25s) of question + answer against the document text", "bm25"))
register(TextMethod("embedding", "Embedding cosine (question + answer)",
                    "all-MiniLM-L6-v2 cosine of question + answer and the document",
                    "embedding"))  # fmt: skip
register(TextMethod("bm25_question", "BM25 (question only)",
                    "BM25 of the question alone (the paper's baseline input)", "bm25",
                    TextQuery.QUESTION))  # fmt: skip
register(TextMethod("embedding_question", "Embedding cosine (question only)",
                    "all-MiniLM-L6-v2 cosine of the question alone", "embedding",
                    TextQuery.QUESTION))  # fmt: skip
register(RandomMethod("random", "Random", "a seeded random score: the floor"))


def describe_methods() -> str:
    """One line per registered method (the CLI's --method help)."""
    return "\n".join(f"{n}: {m.description}" for n, m in METHODS.items())


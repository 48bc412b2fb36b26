"""The attribution-method registry: every method the kit compares is one object here.

Notebook 06 derives single-stage influence, notebook 07 the multi-stage score and its
baselines, notebook 10 the variants measured against retraining. A gradient method scores

    I(z, q) = s(q, z) · Σ_{l ∈ layers} ⟨P_l ∇m(q, θ_query), ∇ℓ(z, θ_candidates)_l⟩

(positive = z helps q; m = −log p(answer | prompt)), and is fully described by where its
query and candidate gradients are taken, its preconditioner P, which layers it sums and its
normalisation s. A text method scores the query text against the document text.

Adding a method is one `register(...)` call (e.g. in this file or your own module) plus
its test: `Attributor.scores`, the explorer, `msif-lite trace --method` and every benchmark
iterate `METHODS`. `multi_stage_cosine` below was added that way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import torch

from msif_lite.engine.ihvp import Damping, InverseHVP
from msif_lite.engine.layers import Grads
from msif_lite.engine.lowrank import LowRankGrads
from msif_lite.engine.multistage import MultiStageIHVP
from msif_lite.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.attribution.attributor import Attributor, QuestionLike


class Stage(str, Enum):
    """Which parameters a gradient or a curvature is taken at."""

    PRETRAINED = "pretrained"  # θ_pt
    FINETUNED = "finetuned"  # θ_ft


class Normalise(str, Enum):
    """How a gradient method rescales its raw score ⟨P∇m, ∇ℓ⟩."""

    NONE = "none"
    UNIT = "unit"  # divide by ‖∇m(q)‖·‖∇ℓ(z)‖ (gradient cosine; TrackStar's unit norm)
    SELF_INFLUENCE = "self_influence"  # divide by √(∇ℓ(z)ᵀ P_z ∇ℓ(z)) (RelatIF)


class TextQuery(str, Enum):
    """What a text method matches against the documents."""

    QUESTION_ANSWER = "question+answer"  # what the gradient methods see (the fair input)
    QUESTION = "question"


ALPHA_MIN = 1e-12  # below this (H_ft + αI) is singular in float32 for any real H_ft


@dataclass(frozen=True)
class ScoreSettings:
    """The knobs a score depends on beyond the fitted factors (the explorer's sliders)."""

    alpha: float  # proximity α: damping of (H_ft + αI), and the factor α of the score
    pretrain_damping: Damping = Damping()  # λ_pt of (H_pt + λ_pt I)
    finetune_damping: Damping = Damping()  # λ_ft of the finetune_only baseline
    include_alpha: bool = True  # multi-stage score = α·(…) = −dm/dε (True) or (…)
    float64: bool = False  # apply the inverses in float64 (tiny λ_pt stay invertible)

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float):
            raise TypeError(f"ScoreSettings.alpha must be a number, got {self.alpha!r}")
        if not 0 < self.alpha < float("inf"):
            raise ValueError(
                f"α = {self.alpha}: the proximity strength α must be a finite number > 0 "
                "(the value the fine-tune was trained with, msif_meta.json records it)"
            )
        if self.alpha < ALPHA_MIN:
            raise ValueError(
                f"α = {self.alpha:g} is below {ALPHA_MIN:g}: (H_ft + αI) is then numerically "
                "singular. Pass the α the fine-tune was trained with; for a fine-tune without "
                "a proximity term use a small proxy such as 1e-3."
            )


class Curvatures(Protocol):
    """What a preconditioner is built from: each stage's curvature inverse."""

    def inverse(self, stage: Stage, damping: Damping, float64: bool = False) -> InverseHVP: ...


# ---------------------------------------------------------------------------- preconditioners
def multi_stage_preconditioner(c: Curvatures, s: ScoreSettings) -> InverseHVP:
    """c · (H_pt + λ_pt I)⁻¹ (H_ft + αI)⁻¹ (notebook 07 §The multi-stage formula)."""
    ft = c.inverse(Stage.FINETUNED, Damping(absolute=s.alpha), s.float64)
    pt = c.inverse(Stage.PRETRAINED, s.pretrain_damping, s.float64)
    return MultiStageIHVP(ft, pt, s.alpha, s.include_alpha)


def pretrain_preconditioner(c: Curvatures, s: ScoreSettings) -> InverseHVP:
    """(H_pt + λ_pt I)⁻¹: single-stage influence, and multi-stage as α → ∞."""
    return c.inverse(Stage.PRETRAINED, s.pretrain_damping, s.float64)


def finetune_preconditioner(c: Curvatures, s: ScoreSettings) -> InverseHVP:
    """(H_ft + λ_ft I)⁻¹ from the fine-tuning data."""
    return c.inverse(Stage.FINETUNED, s.finetune_damping, s.float64)


# ---------------------------------------------------------------------------- method kinds
@dataclass(frozen=True)
class Method:
    """The registry's contract: a name, a label, and a way to score documents."""

    name: str
    label: str
    description: str

    def scores(self, att: Attributor, questions: Sequence[QuestionLike],
               doc_ids: Sequence[str], settings: ScoreSettings) -> torch.Tensor:  # fmt: skip
        """(Q, N) float64 scores, higher = more helpful to the answer."""
        raise NotImplementedError

    def requires(self) -> frozenset[str]:
        """Inputs beyond the two models and the corpus that this method reads from the
        Attributor ("checkpoints", "mentions"); see `Attributor.provides`."""
        return frozenset()


@dataclass(frozen=True)
class GradientMethod(Method):
    """I(z, q) = s(q, z) Σ_{l ∈ layers} ⟨P_l ∇m(q, θ_query), ∇ℓ(z, θ_candidates)_l⟩."""

    query_at: Stage = Stage.FINETUNED
    candidates_at: Stage = Stage.PRETRAINED
    preconditioner: Callable[[Curvatures, ScoreSettings], InverseHVP] | None = None
    damped_stage: Stage | None = None  # the stage whose damping the method exposes
    uses_alpha: bool = False
    normalise: Normalise = Normalise.NONE
    layer_group: str | None = None  # e.g. "mlp": sum only those layers' part of the score
    # the score is ⟨P∇m, ∇ℓ(z)⟩ over the dense stored candidate gradients, so the explorer
    # may compute it from its own cached matrices (False: it calls Attributor.scores)
    dense_dot: ClassVar[bool] = True

    def preconditioned(self, att: Attributor, questions: Sequence[QuestionLike],
                       settings: ScoreSettings, rank: int | None = None
                       ) -> Grads | LowRankGrads:  # fmt: skip
        """P ∇m(q) per question, keyed by the candidate stage's layer names: one layer at a
        time (`Attributor.preconditioned_queries`; the preconditioner is block-diagonal over
        layers, multi-stage applies both stages per layer), so the dense query gradients and
        preconditioned gradients of all layers never coexist. With `rank`, a `LowRankGrads`
        (each layer truncated as soon as it is preconditioned)."""
        ihvp = None if self.preconditioner is None else self.preconditioner(att, settings)
        pre = att.preconditioned_queries(questions, self.query_at, ihvp, rank)
        return att.rename(pre, self.candidates_at)

    def layer_mask(self, att: Attributor) -> torch.Tensor:
        """(L,) 1.0 for the layers this method sums, 0.0 for the others."""
        groups = [m.group for m in att.modules]
        if self.layer_group is None:
            return torch.ones(len(groups), dtype=torch.float64)
        return torch.tensor([g == self.layer_group for g in groups], dtype=torch.float64)

    def scale(self, att: Attributor, questions: Sequence[QuestionLike],
              doc_ids: Sequence[str], settings: ScoreSettings) -> torch.Tensor | None:  # fmt: skip
        """(Q, N) normalisation s(q, z), or None (s = 1)."""
        if self.normalise is Normalise.NONE:
            return None
        if self.normalise is Normalise.SELF_INFLUENCE:
            self_inf = att.self_influence(doc_ids, self.candidates_at, settings)
            return self_inf.clamp_min(1e-30).rsqrt()[None, :].expand(len(questions), -1)
        return self.scale_from(att.query_norms(questions, self.query_at),
                               att.candidate_norms(doc_ids, self.candidates_at))  # fmt: skip

    def scale_from(self, query_norms: torch.Tensor,
                   candidate_norms: torch.Tensor) -> torch.Tensor | None:  # fmt: skip
        """s(q, z) from ‖∇m(q)‖ (Q,) and ‖∇ℓ(z)‖ (N,): 1/(‖∇m‖‖∇ℓ‖) for UNIT, else None."""
        if self.normalise is not Normalise.UNIT:
            return None
        return 1.0 / (query_norms[:, None] * candidate_norms[None, :]).double().clamp_min(1e-30)

    def finish(self, layer_scores: torch.Tensor, scale: torch.Tensor | None,
               mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """(Q, N, L) per-layer ⟨P∇m, ∇ℓ⟩ → (Q, N) score: Σ over the method's layers, × s."""
        s = (layer_scores.double() * mask.to(layer_scores.device)).sum(-1)
        return s if scale is None else s * scale.to(s.device)

    def layer_scores(self, att: Attributor, questions: Sequence[QuestionLike],
                     doc_ids: Sequence[str], settings: ScoreSettings,
                     rank: int | None = None) -> torch.Tensor:  # fmt: skip
        """(Q, N, L) per-layer contributions, normalisation applied, layers not masked;
        `rank`: rank-r preconditioned queries (`preconditioned`)."""
        pre = self.preconditioned(att, questions, settings, rank)
        layers = att.store(self.candidates_at).scores(pre, att.candidates(doc_ids),
                                                      by_module=True).double()  # fmt: skip
        s = self.scale(att, questions, doc_ids, settings)
        return layers if s is None else layers * s[..., None]

    def scores(self, att, questions, doc_ids, settings):
        return self.finish(self.layer_scores(att, questions, doc_ids, settings), None,
                           self.layer_mask(att))  # fmt: skip


@dataclass(frozen=True)
class TextMethod(Method):
    """Text similarity of the query text and the document (no model gradients)."""

    index: str = "bm25"  # "bm25" or "embedding" (Attributor.text_index)
    query: TextQuery = TextQuery.QUESTION_ANSWER

    def query_text(self, q: QuestionLike) -> str:
        from msif_lite.engine.prompts import retrieval_text

        answer = q.answer if self.query is TextQuery.QUESTION_ANSWER else None
        return retrieval_text(q.prompt, answer)

    def scores(self, att, questions, doc_ids, settings):
        index = att.text_index(self.index)
        rows = [index.scores(self.query_text(q), list(doc_ids)) for q in questions]
        return torch.from_numpy(np.stack(rows).astype(np.float64))


@dataclass(frozen=True)
class RandomMethod(Method):
    """A seeded random score per (question, document): the floor every method must beat."""

    seed: int = 0

    def scores(self, att, questions, doc_ids, settings):
        def u(q, d) -> float:
            h = hashlib.sha256(f"{self.seed}|{q.prompt}|{q.answer}|{d}".encode()).digest()
            return int.from_bytes(h[:8], "little") / 2**64

        return torch.tensor([[u(q, d) for d in doc_ids] for q in questions], dtype=torch.float64)


# ---------------------------------------------------------------------------- the registry
METHODS: Registry[Method] = Registry("method", "method= (or --method)")


def register(method: Method) -> Method:
    """Add a method (its name must be new); returns it."""
    return METHODS.register(method)


def get_method(name: str) -> Method:
    """The registered method called `name`; a clear error lists the others."""
    return METHODS.lookup(name)


def available(att: Attributor) -> list[str]:
    """The registered methods this Attributor has every input for (benchmarks, explorer)."""
    return [n for n, m in METHODS.items() if m.requires() <= att.provides]


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



# the variants of Notebook 11 and multi_stage_projected (attribution/projected.py) register
# themselves (after the registry above exists)
from msif_lite.attribution import projected as _projected  # noqa: E402, F401
from msif_lite.attribution import variants as _variants  # noqa: E402, F401


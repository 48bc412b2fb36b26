"""The score, written once (notebook 06 §Scoring documents, notebook 07 §Fact tracing).

A gradient method's score of document z for question q is

    I(z, q) = s(q, z) · Σ_l w_l ⟨P_l ∇m(q), ∇ℓ(z)_l⟩

with per-layer dot products ⟨P_l ∇m, ∇ℓ_l⟩ (from a GradientStore, the explorer's cached
matrices or a benchmark's in-memory gradients), the method's layer weights w_l (1, or 0
outside its `layer_group`) and its normalisation s(q, z):

    none            s = 1
    unit            s = 1 / (‖∇m(q)‖ ‖∇ℓ(z)‖)                        (gradient cosine)
    self_influence  s = 1 / √(∇ℓ(z)ᵀ (H + λI)⁻¹ ∇ℓ(z))               (RelatIF)

Every consumer (`Attributor.scores`, the explorer, the benchmarks) turns per-layer dot
products into scores with `finish`; tests/test_scoring_path.py checks that they agree for
every registered method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from msif_lite.attribution.encoder import QuestionLike
from msif_lite.attribution.settings import Normalise, ScoreSettings

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.attribution.context import ScoringContext
    from msif_lite.attribution.methods import GradientMethod


def normalisation(method: GradientMethod, ctx: ScoringContext,
                  questions: Sequence[QuestionLike], doc_ids: Sequence[str],
                  settings: ScoreSettings, candidate_norms: torch.Tensor | None = None
                  ) -> torch.Tensor | None:  # fmt: skip
    """(Q, N) s(q, z), or None (s = 1). `candidate_norms`: ‖∇ℓ(z)‖ if the caller already
    holds the gradients (else from the stage's memo)."""
    if method.normalise is Normalise.NONE:
        return None
    stage = ctx.stage(method.candidates_at)
    if method.normalise is Normalise.SELF_INFLUENCE:
        si = stage.self_influence(ctx.candidates(doc_ids), settings.damping(method.candidates_at),
                                  settings.float64)  # fmt: skip
        return si.clamp_min(1e-30).rsqrt()[None, :].expand(len(questions), -1)
    if candidate_norms is None:
        candidate_norms = stage.candidate_norms(ctx.candidates(doc_ids))
    q_norms = ctx.stage(method.query_at).query_norms(questions)
    return 1.0 / (q_norms[:, None] * candidate_norms[None, :].double()).clamp_min(1e-30)


def finish(method: GradientMethod, ctx: ScoringContext, questions: Sequence[QuestionLike],
           doc_ids: Sequence[str], settings: ScoreSettings, layers: torch.Tensor, *,
           candidate_norms: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(Q, N, L) per-layer ⟨P_l∇m, ∇ℓ_l⟩ → (Q, N, L) s(q, z)·w_l·⟨…⟩ in float64; the score
    is its sum over the last axis."""
    out = layers.double()
    s = normalisation(method, ctx, questions, doc_ids, settings, candidate_norms)
    if s is not None:
        out = out * s.to(out.device)[..., None]
    return out * method.layer_mask(ctx).to(out.device)

"""The knobs a score depends on beyond the fitted factors (notebook 07; the explorer's
sliders): which stage a gradient is taken at, how a method normalises, the proximity α and
the two stages' dampings. α is checked in one place, `engine.multistage.check_alpha`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from msif_lite.engine.ihvp import Damping
from msif_lite.engine.multistage import ALPHA_MIN, check_alpha

__all__ = ["ALPHA_MIN", "Normalise", "ScoreSettings", "Stage", "TextQuery", "as_damping"]


class Stage(str, Enum):
    """Which parameters a gradient or a curvature is taken at."""

    PRETRAINED = "pretrained"  # θ_pt
    FINETUNED = "finetuned"  # θ_ft


class Normalise(str, Enum):
    """How a gradient method rescales its raw score ⟨P∇m, ∇ℓ⟩ (`scoring.normalisation`)."""

    NONE = "none"
    UNIT = "unit"  # divide by ‖∇m(q)‖·‖∇ℓ(z)‖ (gradient cosine; TrackStar's unit norm)
    SELF_INFLUENCE = "self_influence"  # divide by √(∇ℓ(z)ᵀ P_z ∇ℓ(z)) (RelatIF)


class TextQuery(str, Enum):
    """What a text method matches against the documents."""

    QUESTION_ANSWER = "question+answer"  # what the gradient methods see (the fair input)
    QUESTION = "question"


def as_damping(value, where: str) -> Damping:
    """A number λ → Damping(absolute=λ); a Damping as is; anything else a TypeError."""
    if isinstance(value, Damping):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Damping(absolute=float(value))
    raise TypeError(f"{where} must be a number (λ) or a Damping, e.g. 1e-4, "
                    f"Damping(absolute=1e-4) or Damping(heuristic_factor=0.1); got {value!r}")


@dataclass(frozen=True)
class ScoreSettings:
    """Per-call score settings (`AttributionConfig.score_settings()` makes the default)."""

    alpha: float  # proximity α: damping of (H_ft + αI), and the factor α of the score
    pretrain_damping: Damping = Damping()  # λ_pt of (H_pt + λ_pt I)
    finetune_damping: Damping = Damping()  # λ_ft of (H_ft + λ_ft I): the finetune_only method
    include_alpha: bool = True  # multi-stage score = α·(…) = −dm/dε (True) or (…)
    float64: bool = False  # apply the inverses in float64 (tiny λ_pt stay invertible)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha, "ScoreSettings.alpha"))
        for name in ("pretrain_damping", "finetune_damping"):
            object.__setattr__(self, name, as_damping(getattr(self, name),
                                                      f"ScoreSettings.{name}"))

    def damping(self, stage: Stage) -> Damping:
        """The damping of a stage's single-stage inverse (H_stage + λ I)⁻¹."""
        return self.pretrain_damping if stage is Stage.PRETRAINED else self.finetune_damping

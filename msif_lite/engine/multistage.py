"""The multi-stage influence function (arXiv 2505.05017; Chen et al. 2020).

Notebook 07 §The multi-stage formula derives it. Fine-tuning with a proximity term,

    θ_ft = argmin_θ  L_ft(θ) + (α/2)‖θ − θ_pt‖²,

has the stationarity condition ∇L_ft(θ_ft) + α(θ_ft − θ_pt) = 0, so
dθ_ft/dθ_pt = α (H_ft + αI)⁻¹. Up-weighting a pre-training document z by ε moves the
pre-trained optimum by dθ_pt/dε = −(H_pt + λ_pt I)⁻¹ ∇ℓ(z, θ_pt). By the chain rule

    dm(q, θ_ft)/dε = −α ∇m(q, θ_ft)ᵀ (H_ft + αI)⁻¹ (H_pt + λ_pt I)⁻¹ ∇ℓ(z, θ_pt),

and the kit reports the multi-stage score I_ms(z, q) = −dm/dε (positive = z helps q):
the query gradient at θ_ft, preconditioned once by the fine-tuning curvature with damping
exactly α and then by the pre-training curvature with damping λ_pt, dotted with candidate
gradients at θ_pt. Both H are symmetric, so preconditioning the query in that order is
the same as preconditioning the candidate in the opposite order.

H_ft is the Hessian of the objective the fine-tune minimised. The kit's fine-tune (and any
Hugging Face one) minimises the token *mean* Σ_n ℓ_n / Σ_n t_n plus the penalty, while G_ft
is fitted from per-pair token sums averaged over pairs: H_ft = G_ft / T̄, T̄ the mean number
of answer tokens per pair. The Attributor applies that factor (`AttributionConfig.
finetune_loss`); without it α would be compared with a curvature T̄ times too large.

The factor α changes the scale, not the ranking: `include_alpha=True` (the default)
reports −dm/dε itself; False reports it divided by α. As α → ∞, α(H_ft + αI)⁻¹ → I and
the score tends to single-stage influence at θ_pt with the query gradient taken at θ_ft.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from msif_lite.engine.curvature import curvature as lookup
from msif_lite.engine.factors import EKFACFactors
from msif_lite.engine.ihvp import Damping, InverseHVP
from msif_lite.engine.layers import Grads

Stage = Literal["pretrained", "finetuned"]  # the values of attribution.settings.Stage

ALPHA_MIN = 1e-12  # below this (H_ft + αI) is singular in float32 for any real H_ft


def check_alpha(alpha, where: str = "alpha") -> float:
    """The one check of α (every config that holds α calls it): a finite number ≥ ALPHA_MIN."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"{where} must be a number, got {alpha!r}")
    if not 0 < alpha < float("inf"):
        raise ValueError(
            f"{where}={alpha}: the proximity strength α must be > 0 and finite (the value "
            "the fine-tune was trained with, msif_meta.json records it); a fine-tune without "
            "the penalty has no multi-stage formula (use a small α, e.g. 1e-3, as a proxy)."
        )
    if alpha < ALPHA_MIN:
        raise ValueError(
            f"{where}={alpha:g} is below {ALPHA_MIN:g}: (H_ft + αI) is then numerically "
            "singular. Pass the α the fine-tune was trained with; for a fine-tune without "
            "a proximity term use a small proxy such as 1e-3."
        )
    return float(alpha)


@dataclass(frozen=True)
class MultiStageConfig:
    """Settings of the multi-stage score (Notebook 07)."""

    alpha: float
    """Proximity strength α of the fine-tune: the damping of (H_ft + αI). Use the value the
    fine-tune was trained with (stored in the checkpoint's msif_meta.json)."""
    pretrain_damping: Damping = Damping()
    """λ_pt for (H_pt + λ_pt I): absolute, or the heuristic 0.1 · mean(Λ) per layer."""
    include_alpha: bool = True
    """True: report −dm/dε = α ∇mᵀ(H_ft+αI)⁻¹(H_pt+λ)⁻¹∇ℓ. False: leave out the factor α."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha, "MultiStageConfig.alpha"))


class MultiStageIHVP:
    """v ↦ c · (H_pt + λ_pt I)⁻¹ (H_ft + αI)⁻¹ v, c = α (or 1 without `include_alpha`).

    `finetune` must be damped with exactly α; `pretrain` with λ_pt. Any two InverseHVP
    implementations compose (EK-FAC, K-FAC, the dense references of `msif_lite.engine.exact`).
    """

    name = "multi_stage"

    def __init__(
        self, finetune: InverseHVP, pretrain: InverseHVP, alpha: float, include_alpha: bool = True
    ):
        MultiStageConfig(alpha=alpha)  # validates α
        self.finetune, self.pretrain = finetune, pretrain
        self.alpha, self.include_alpha = float(alpha), include_alpha
        self.scale = float(alpha) if include_alpha else 1.0
        self.fisher = getattr(pretrain, "fisher", None)
        ft_names = getattr(finetune, "module_names", None)
        pt_names = getattr(pretrain, "module_names", None)
        if ft_names is not None and pt_names is not None and tuple(ft_names) != tuple(pt_names):
            raise ValueError(
                "the fine-tuning and pre-training curvatures cover different layers "
                f"({list(ft_names)} vs {list(pt_names)}); fit both with the same "
                "FactorConfig.include / exclude."
            )

    def apply(self, vectors: Grads) -> Grads:
        """c · (H_pt + λ_pt I)⁻¹ [(H_ft + αI)⁻¹ v]: fine-tuning stage first."""
        out = self.pretrain.apply(self.finetune.apply(vectors))
        return {k: v * self.scale for k, v in out.items()} if self.scale != 1.0 else out

    @classmethod
    def compose(cls, inverse: Callable[[Stage, Damping], InverseHVP],
                config: MultiStageConfig) -> MultiStageIHVP:  # fmt: skip
        """The one construction of the multi-stage inverse: `inverse(stage, damping)` gives
        each stage's (H + λI)⁻¹; the fine-tuning stage is damped with exactly α, the
        pre-training stage with λ_pt (the Attributor's methods and `from_factors` both
        build it here)."""
        ft = inverse("finetuned", Damping(absolute=config.alpha))
        pt = inverse("pretrained", config.pretrain_damping)
        return cls(ft, pt, config.alpha, config.include_alpha)

    @classmethod
    def from_factors(
        cls,
        finetune_factors,
        pretrain_factors,
        config: MultiStageConfig,
        curvature: str | None = None,
    ) -> MultiStageIHVP:
        """From two stages' fitted factors with the registered `curvature` (None: EK-FAC
        where Λ is fitted, else K-FAC). The factors are used as given (the Attributor also
        rescales H_ft to the fine-tune's objective, `AttributionConfig.finetune_loss`)."""
        for f, stage in ((finetune_factors, "fine-tuning"), (pretrain_factors, "pre-training")):
            if f.module_names != pretrain_factors.module_names:
                raise ValueError(
                    f"the {stage} factors cover layers {list(f.module_names)}, the other stage "
                    f"{list(pretrain_factors.module_names)}: refit with the same include/exclude."
                )
        factors = {"finetuned": finetune_factors, "pretrained": pretrain_factors}

        def inverse(stage: Stage, damping: Damping) -> InverseHVP:
            f = factors[stage]
            name = curvature or ("ekfac" if isinstance(f, EKFACFactors) and f.has_lambda
                                 else "kfac")  # fmt: skip
            return lookup(name).inverse(f, damping)

        return cls.compose(inverse, config)

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

from dataclasses import dataclass

from msif_lite.engine.factors import EKFACFactors, KFACFactors
from msif_lite.engine.ihvp import EKFACIHVP, KFACIHVP, Damping, InverseHVP
from msif_lite.engine.layers import Grads


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
        if not self.alpha > 0:
            raise ValueError(
                f"MultiStageConfig.alpha={self.alpha}: α must be > 0. It is the proximity "
                "strength of the fine-tune ((α/2)‖θ − θ_pt‖²); a fine-tune without the "
                "penalty has no multi-stage formula (use a small α, e.g. 1e-3, as a proxy)."
            )


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
    def from_factors(
        cls,
        finetune_factors: EKFACFactors | KFACFactors,
        pretrain_factors: EKFACFactors | KFACFactors,
        config: MultiStageConfig,
    ) -> MultiStageIHVP:
        """EK-FAC on both stages (K-FAC where only K-FAC factors are given)."""
        for f, stage in ((finetune_factors, "fine-tuning"), (pretrain_factors, "pre-training")):
            if f.module_names != pretrain_factors.module_names:
                raise ValueError(
                    f"the {stage} factors cover layers {list(f.module_names)}, the other stage "
                    f"{list(pretrain_factors.module_names)}: refit with the same include/exclude."
                )

        def make(f, damping):
            ok = isinstance(f, EKFACFactors) and f.has_lambda
            return EKFACIHVP(f, damping) if ok else KFACIHVP(f, damping)

        ft = make(finetune_factors, Damping(absolute=config.alpha))
        pt = make(pretrain_factors, config.pretrain_damping)
        return cls(ft, pt, config.alpha, config.include_alpha)

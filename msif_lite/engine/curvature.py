"""The curvature registry: which approximation of G stands in `(G + λI)⁻¹` (notebooks 03–04).

One `Curvature` per approximation, selected by name (`AttributionConfig.curvature`):

    ekfac     G_l ≈ (Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ       notebook 04 §The eigenbasis
    kfac      G_l ≈ A ⊗ S                                  notebook 03 §The Fisher block
    identity  G = 0, so (G + λI)⁻¹ = I/λ; with λ = 0 the plain gradient (no curvature)

Each entry says how to fit its factors on a stage's data (`fit`) and how to turn fitted
factors and a damping into an `InverseHVP` (`inverse`). A new approximation is one
`register(Curvature(...))` call; the multi-stage composition (`engine.multistage`) takes
any two `InverseHVP`s, so it composes any pair of registered curvatures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from torch import nn

from msif_lite.engine.factors import EKFACFactors, FactorConfig
from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, KFACIHVP, Damping, IdentityIHVP, InverseHVP
from msif_lite.engine.layers import Grads, TrackedModule
from msif_lite.engine.tasks import Task
from msif_lite.registry import Registry


class CurvatureKind(str, Enum):
    """The registered curvature approximations (values are the registry names)."""

    EKFAC = "ekfac"
    KFAC = "kfac"
    IDENTITY = "identity"


class ScaledIdentityIHVP:
    """(0 + λI)⁻¹ v = v / λ (the identity curvature with damping λ > 0); λ = 0 → v."""

    name = "identity"
    fisher = None

    def __init__(self, damping: float):
        self.damping = float(damping)
        self.damping_values: dict[str, float] = {}

    def apply(self, vectors: Grads) -> Grads:
        if self.damping == 0.0:
            return dict(vectors)
        return {k: v / self.damping for k, v in vectors.items()}


@dataclass(frozen=True)
class Curvature:
    """One approximation of G: how to fit it and how to invert it with damping."""

    name: str
    description: str
    fit: Callable[[nn.Module, Task, Iterable, FactorConfig, Sequence[TrackedModule]],
                  EKFACFactors | None]
    inverse: Callable[[EKFACFactors | None, Damping], InverseHVP]
    needs_factors: bool = True


def _fit_kfac(model, task, batches, config, modules) -> EKFACFactors:
    """A, S and their eigenbases (no Λ pass): what K-FAC's inverse needs."""
    dev = next(model.parameters()).device if config.offload else None
    return fit_eigenbasis(fit_covariances(model, task, batches, config, modules), dev)


def _identity_inverse(factors, damping: Damping) -> InverseHVP:
    if damping.absolute is None:
        return IdentityIHVP()  # no eigenvalues to take a relative damping of: λ = 0
    return ScaledIdentityIHVP(damping.absolute)


CURVATURES: Registry[Curvature] = Registry("curvature", "AttributionConfig.curvature")


def register(curvature: Curvature) -> Curvature:
    """Add a curvature approximation to the registry (its name must be new)."""
    return CURVATURES.register(curvature)


register(Curvature("ekfac", "EK-FAC: Kronecker eigenbasis, eigenvalues refitted (Λ)",
                   fit_ekfac, EKFACIHVP))  # fmt: skip
register(Curvature("kfac", "K-FAC: A ⊗ S, eigenvalues λ_S λ_Aᵀ", _fit_kfac, KFACIHVP))
register(Curvature("identity", "no curvature: (λI)⁻¹ (the gradient dot product at λ = 0)",
                   lambda *a: None, _identity_inverse, needs_factors=False))  # fmt: skip


def curvature(name: str | CurvatureKind) -> Curvature:
    """The registered curvature called `name`; a clear error lists the others."""
    return CURVATURES.lookup(name.value if isinstance(name, CurvatureKind) else name)

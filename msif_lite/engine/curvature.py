"""The curvature registry: which approximation of G stands in `(G + λI)⁻¹` (notebooks 03–04).

One `Curvature` per approximation, selected by name (`AttributionConfig.curvature`, the
CLI's `--curvature`):

    ekfac     G_l ≈ (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ       notebook 04 §The eigenbasis
    kfac      G_l ≈ S ⊗ A                                  notebook 03 §The Fisher block
    identity  G = 0, so (G + λI)⁻¹ = I/λ; with λ = 0 the plain gradient (no curvature)
    …         any module in `msif_lite/engine/curvatures/` (e.g. `diagonal`): each file
              registers its own entry and is found by name, nothing else is edited

An entry owns its factor type (how the fitted factors are saved, loaded, rescaled and cast:
the `Factors` protocol below; None when the curvature has no factors), says how to fit them
on a stage's data (`fit`) and how to turn them and a damping into an `InverseHVP`
(`inverse`), and declares what its inverse can do (`whitening`: it exposes its damped
eigenvalues for `attribution.projected`). The multi-stage composition (`engine.multistage`)
takes any two `InverseHVP`s, so it composes any pair of registered curvatures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from msif_lite.engine.factors import EKFACFactors, FactorConfig
from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, KFACIHVP, Damping, IdentityIHVP, InverseHVP
from msif_lite.engine.layers import Grads, TrackedModule
from msif_lite.engine.tasks import Task
from msif_lite.registry import Registry


class Factors(Protocol):
    """What the Attributor's factor cache and the stages need of a curvature's factors."""

    module_names: tuple[str, ...]

    def save(self, path: str | Path, model: nn.Module, data_fingerprint: str) -> Path: ...

    def scaled(self, c: float) -> Factors: ...  # the factors of c·G

    def to(self, dtype: torch.dtype) -> Factors: ...


class ScaledIdentityIHVP:
    """(0 + λI)⁻¹ v = v / λ (the identity curvature with damping λ > 0); λ = 0 → v."""

    name = "identity"
    fisher = None

    def __init__(self, damping: float):
        self.damping = float(damping)
        self.damping_values: dict[str, float] = {}

    def layer(self, name: str) -> ScaledIdentityIHVP:
        return self

    def apply(self, vectors: Grads) -> Grads:
        if self.damping == 0.0:
            return dict(vectors)
        return {k: v / self.damping for k, v in vectors.items()}


FitFn = Callable[[nn.Module, Task, Iterable, FactorConfig, Sequence[TrackedModule]], Any]


@dataclass(frozen=True)
class Curvature:
    """One approximation of G: its factor type, how to fit it and invert it with damping."""

    name: str
    description: str
    fit: FitFn
    inverse: Callable[[Any, Damping], InverseHVP]
    factors: type | None = EKFACFactors  # the factor type (load/save; None: no factors)
    whitening: bool = False  # the inverse has `whitening_factors()` (damped eigenvalues)

    @property
    def needs_factors(self) -> bool:
        return self.factors is not None

    def load(self, path: Path, model: nn.Module, config: FactorConfig, data_fp: str,
             modules: Sequence[TrackedModule]):  # fmt: skip
        """The factors stored at `path` for this model, data and config (the factor type's
        `load`: raises FileNotFoundError or an ArtifactError when they do not match)."""
        return self.factors.load(path, model, config, data_fp, modules)


def _fit_kfac(model, task, batches, config, modules) -> EKFACFactors:
    """A, S and their eigenbases (no Λ pass): what K-FAC's inverse needs."""
    dev = next(model.parameters()).device if config.offload else None
    return fit_eigenbasis(fit_covariances(model, task, batches, config, modules), dev)


def _identity_inverse(factors, damping: Damping) -> InverseHVP:
    if damping.absolute is None:
        return IdentityIHVP()  # no eigenvalues to take a relative damping of: λ = 0
    return ScaledIdentityIHVP(damping.absolute)


CURVATURES: Registry[Curvature] = Registry(
    "curvature", "AttributionConfig.curvature (or --curvature)",
    discover=("msif_lite.engine.curvatures",))


def register(curvature: Curvature) -> Curvature:
    """Add a curvature approximation to the registry (its name must be new)."""
    return CURVATURES.register(curvature)


register(Curvature("ekfac", "EK-FAC: Kronecker eigenbasis, eigenvalues refitted (Λ)",
                   fit_ekfac, EKFACIHVP, whitening=True))  # fmt: skip
register(Curvature("kfac", "K-FAC: S ⊗ A, eigenvalues d_S d_Aᵀ", _fit_kfac, KFACIHVP,
                   whitening=True))  # fmt: skip
register(Curvature("identity", "no curvature: (λI)⁻¹ (the gradient dot product at λ = 0)",
                   lambda *a: None, _identity_inverse, factors=None))  # fmt: skip


def curvature(name: str) -> Curvature:
    """The registered curvature called `name`; a clear error lists the others."""
    return CURVATURES.lookup(getattr(name, "value", name))

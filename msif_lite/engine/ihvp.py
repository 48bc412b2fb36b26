"""Inverse-Hessian(-approximation)-vector products: v ↦ (G + λI)⁻¹ v, per tracked layer.

Notebook 04 §Inverting EK-FAC, and damping: with G_l ≈ (Q_S ⊗ Q_A) diag(D) (Q_S ⊗ Q_A)ᵀ,

    (G_l + λ_l I)⁻¹ V = Q_S [ (Q_Sᵀ V Q_A) ⊘ (D + λ_l) ] Q_Aᵀ,

D = d_S d_Aᵀ for K-FAC and D = Λ for EK-FAC. Damping is applied at use time and never
written back into the factors. In the kit's row-major `flatten` the explicit matrix of a
layer is torch.kron(S, A) (K-FAC) or kron(Q_S, Q_A) diag(vec Λ) kron(Q_S, Q_A)ᵀ (EK-FAC).

`InverseHVP` is the protocol the exact references in `msif_lite.engine.exact` also implement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch

from msif_lite.engine.factors import EKFACFactors, KFACFactors
from msif_lite.engine.fit import fit_eigenbasis
from msif_lite.engine.layers import Grads, check_finite


@runtime_checkable
class InverseHVP(Protocol):
    """v ↦ (G + λI)⁻¹ v for per-layer vectors (Q, out, d_in); same shapes out."""

    name: str

    def apply(self, vectors: Grads) -> Grads: ...


@dataclass(frozen=True)
class Damping:
    """λ_l = `absolute` if given, else heuristic_factor · mean(D_l), D_l the layer's curvature
    eigenvalues (EK-FAC: Λ_l; K-FAC: the Kronecker eigenvalues d_S d_Aᵀ)."""

    absolute: float | None = None
    heuristic_factor: float = 0.1

    def __post_init__(self) -> None:
        if self.absolute is not None and not self.absolute >= 0:
            raise ValueError(f"Damping(absolute=...) must be >= 0, got {self.absolute}")
        if not self.heuristic_factor >= 0:
            raise ValueError(f"heuristic_factor must be >= 0, got {self.heuristic_factor}")

    def value(self, eigenvalues: torch.Tensor) -> float:
        if self.absolute is not None:
            return float(self.absolute)
        return self.heuristic_factor * float(eigenvalues.double().mean())


class IdentityIHVP:
    """G = I, λ = 0: influence reduces to the plain gradient dot product ∇mᵀ∇ℓ."""

    name = "identity"
    fisher = None

    def __init__(self) -> None:
        self.damping_values: dict[str, float] = {}

    def layer(self, name: str) -> IdentityIHVP:
        return self

    def apply(self, vectors: Grads) -> Grads:
        return dict(vectors)


class _EigenIHVP:
    """Shared eigenbasis inverse; subclasses choose the eigenvalues D_l."""

    name = ""

    def __init__(self, factors: EKFACFactors, damping: Damping = Damping()):
        self.factors = factors
        self.damping = damping
        self.fisher = factors.fisher
        self.module_names = factors.module_names
        self.damping_values: dict[str, float] = {}
        self._denoms: list[torch.Tensor] = []
        for f in factors.layers:
            d = self._eigenvalues(f)
            check_finite({f.name: d}, "curvature eigenvalues")
            lam = damping.value(d)
            denom = d + lam  # a new tensor: the factors are never modified
            if not float(denom.min()) > torch.finfo(denom.dtype).eps * float(denom.abs().max()):
                raise ValueError(
                    f"layer {f.name!r}: the damped curvature D + λ (λ = {lam:g}) is singular "
                    f"(smallest entry {float(denom.min()):.3g}), so (G + λI)⁻¹ does not exist. "
                    "Set Damping(absolute=...) > 0 or use the heuristic Damping() "
                    "(λ = 0.1 · mean eigenvalue)."
                )
            self.damping_values[f.name] = lam
            self._denoms.append(denom)

    def _eigenvalues(self, f) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_keys(self, vectors: Mapping[str, torch.Tensor]) -> None:
        got, want = set(vectors), set(self.module_names)
        if got != want:
            raise ValueError(
                f"{self.name}: the vectors are for layers {sorted(got)} but the factors were "
                f"fitted for {sorted(want)} (missing: {sorted(want - got)}, extra: "
                f"{sorted(got - want)}). Compute the gradients with the same `modules` as the "
                "factors (find_modules(model, config.include, config.exclude))."
            )
        for f in self.factors.layers:
            if tuple(vectors[f.name].shape[-2:]) != f.shape:
                raise ValueError(
                    f"{self.name}: layer {f.name!r} vectors have shape "
                    f"{tuple(vectors[f.name].shape[-2:])}, factors {f.shape}: another model?"
                )

    def whitening_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (Q_S, Q_A, √(D_l + λ_l)): the damped eigenvalues this inverse divides by,
        for whitening (`attribution.projected.Whitening`); one derivation of D + λ."""
        return {f.name: (f.q_s, f.q_a, denom.sqrt())
                for f, denom in zip(self.factors.layers, self._denoms)}  # fmt: skip

    def layer(self, name: str) -> _EigenIHVP:
        """The block (G_l + λ_l I)⁻¹ of one layer, with the same λ_l."""
        one = replace(self.factors, layers=(self.factors.layer(name),))
        return type(self)(one, Damping(absolute=self.damping_values[name]))

    def apply(self, vectors: Grads) -> Grads:
        """(G_l + λ_l I)⁻¹ V_l = Q_S [(Q_Sᵀ V_l Q_A) ⊘ (D_l + λ_l)] Q_Aᵀ for every layer."""
        self._check_keys(vectors)
        out = {}
        for f, denom in zip(self.factors.layers, self._denoms):
            v = vectors[f.name]
            dt = torch.promote_types(v.dtype, f.q_a.dtype)
            qa, qs = f.q_a.to(v.device, dt), f.q_s.to(v.device, dt)
            rot = qs.T @ v.to(dt) @ qa
            out[f.name] = (qs @ (rot / denom.to(v.device, dt)) @ qa.T).to(v.dtype)
        return out


class KFACIHVP(_EigenIHVP):
    """(S ⊗ A + λI)⁻¹ through the eigenbases: D = d_S d_Aᵀ (Notebook 03 §Inverting a Kronecker)."""

    name = "kfac"

    def __init__(self, factors: KFACFactors | EKFACFactors, damping: Damping = Damping()):
        if isinstance(factors, KFACFactors):
            factors = fit_eigenbasis(factors)
        super().__init__(factors, damping)

    def _eigenvalues(self, f) -> torch.Tensor:
        return torch.outer(f.eig_s, f.eig_a)


class EKFACIHVP(_EigenIHVP):
    """EK-FAC: D = Λ = E_n[(Q_Sᵀ DW_n Q_A)^⊙2] (Notebook 04 §The eigenbasis)."""

    name = "ekfac"

    def __init__(self, factors: EKFACFactors, damping: Damping = Damping()):
        if not isinstance(factors, EKFACFactors) or not factors.has_lambda:
            raise ValueError(
                "EKFACIHVP needs EK-FAC factors with fitted eigenvalues Λ: use fit_ekfac(...) "
                "(or fit_lambda after fit_eigenbasis); for K-FAC factors use KFACIHVP."
            )
        super().__init__(factors, damping)

    def _eigenvalues(self, f) -> torch.Tensor:
        return f.lam

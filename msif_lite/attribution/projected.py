"""Projected candidate gradients: a Kronecker random projection of each layer (LoGra-style).

docs/design.md §Memory and disk at scale. A layer's per-document gradient DW = Σ_t Ds_t ā_tᵀ
is an (o, d_in) matrix; with random Π_in (k_in, d_in) and Π_out (k_out, o) the store keeps

    G̃ = Π_out DW Π_inᵀ = Σ_t (Π_out Ds_t)(Π_in ā_t)ᵀ        (k_out, k_in)

computed from the captured tokens (never forming DW), k_out·k_in numbers instead of o·d_in.
The query side is projected the same way, so a score is ⟨Π_out P_l Π_inᵀ, G̃_l⟩ with P_l the
full-dimensional preconditioned query gradient (EK-FAC in the full space). With
E[Π_inᵀ Π_in] = I and E[Π_outᵀ Π_out] = I (independent), the projected score is an unbiased
estimate of ⟨P_l, DW_l⟩ (Johnson–Lindenstrauss); its error shrinks as 1/√k.

Whitening (default for the registered method): a random projection keeps ⟨x, y⟩ only up to
≈ ‖x‖‖y‖/√k, and the preconditioned query P = (H + λI)⁻¹∇m is dominated by low-curvature
directions where candidate gradients are small, so cos(P, ∇ℓ) is tiny and the projection
noise swamps the differences between documents. With the pre-training EK-FAC eigenbasis
(Q_S, Q_A) and its damped eigenvalues D = Λ + λ_pt,

    ⟨P, DW⟩ = ⟨(Q_Sᵀ P Q_A) ⊙ √D, (Q_Sᵀ DW Q_A) ⊘ √D⟩

exactly (a rotation and a diagonal rescaling); both sides are then projected, the candidate
side (H_pt + λ_pt I)^{-1/2}∇ℓ in the eigenbasis has balanced norms, and the estimate stays
unbiased. The candidate side then forms DW_l per batch (B·o·d_in, not stored) before the
projection; the store is keyed by the whitening too.

Kinds: `orthogonal` (default): Π = √(d/k) · k orthonormal rows of a random rotation, so at
k = d it is an orthogonal matrix and the score is exact; `gaussian`: i.i.d. N(0, 1/k) entries
(TRAK-style). The matrices are drawn from `seed` and the layer name, so both sides and every
run agree. Registered as `multi_stage_projected` (k_in = k_out = 64, whitened).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import ClassVar

import torch

from msif_lite.attribution.context import ScoringContext
from msif_lite.attribution.methods import (
    FT,
    PT,
    GradientMethod,
    Normalise,
    multi_stage_preconditioner,
    register,
)
from msif_lite.engine.capture import BatchCapture
from msif_lite.engine.ihvp import InverseHVP
from msif_lite.engine.layers import Grads, TrackedModule


@dataclass(frozen=True)
class Whitening:
    """Per layer (Q_S, Q_A, √D): X ↦ (Q_Sᵀ X Q_A) ⊘ √D (candidates) or ⊙ √D (queries)."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    fingerprint: str

    @classmethod
    def from_inverse(cls, ihvp: InverseHVP) -> Whitening:
        """From an inverse that exposes its damped eigenvalues (`whitening_factors()`: a
        curvature registered with whitening=True, e.g. EK-FAC, K-FAC, diagonal)."""
        if not hasattr(ihvp, "whitening_factors"):
            raise ValueError(
                f"the {getattr(ihvp, 'name', type(ihvp).__name__)!r} curvature "
                "has no eigenvalues to whiten with: use a "
                "curvature registered with whitening=True (AttributionConfig(curvature="
                "'ekfac')) or a ProjectedGradientMethod with whiten=False")
        h, layers = hashlib.sha256(), dict(ihvp.whitening_factors())
        for name in sorted(layers):
            for t in layers[name]:
                h.update(t.detach().double().cpu().numpy().tobytes())
        return cls(layers, h.hexdigest()[:16])

    def apply(self, name: str, x: torch.Tensor, query: bool) -> torch.Tensor:
        q_s, q_a, root = (t.to(x.device, x.dtype) for t in self.layers[name])
        rot = q_s.T @ x @ q_a
        return rot * root if query else rot / root


class ProjectionKind(str, Enum):
    """How the random projection matrices are drawn."""

    ORTHOGONAL = "orthogonal"  # √(d/k) × k orthonormal rows: exact at k = d
    GAUSSIAN = "gaussian"  # i.i.d. N(0, 1/k)


@dataclass(frozen=True)
class KroneckerProjection:
    """Π_out X Π_inᵀ per layer, with k_in = min(k_in, d_in) and k_out = min(k_out, o)."""

    k_in: int
    k_out: int
    kind: ProjectionKind = ProjectionKind.ORTHOGONAL
    seed: int = 0
    whitening: Whitening | None = field(default=None, compare=False, repr=False, hash=False)
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("k_in", "k_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KroneckerProjection.{name} must be an int >= 1, got {v!r}")
        object.__setattr__(self, "kind", ProjectionKind(self.kind))

    @property
    def fingerprint(self) -> str:
        w = f"-white{self.whitening.fingerprint}" if self.whitening is not None else ""
        return f"kron-{self.kind.value}-{self.k_in}x{self.k_out}-seed{self.seed}{w}"

    def shape(self, module: TrackedModule) -> tuple[int, int]:
        return (min(self.k_out, module.out_features), min(self.k_in, module.d_in))

    def _draw(self, name: str, side: str, k: int, d: int) -> torch.Tensor:
        """(k, d) float64 matrix with E[ΠᵀΠ] = I, the same for every call."""
        key = (name, side)
        if key not in self._cache:
            h = hashlib.sha256(f"{self.seed}|{name}|{side}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") % 2**63)
            x = torch.randn(d, k, generator=g, dtype=torch.float64)
            if self.kind is ProjectionKind.ORTHOGONAL:
                q, r = torch.linalg.qr(x)  # (d, k) orthonormal columns, signs fixed by r
                self._cache[key] = ((d / k) ** 0.5 * (q * torch.sign(torch.diagonal(r)))).T
            else:
                self._cache[key] = x.T / k**0.5
        return self._cache[key]

    def matrices(self, m: TrackedModule, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Π_out (k_out, o), Π_in (k_in, d_in)) of layer m, on `like`'s device and dtype."""
        k_out, k_in = self.shape(m)
        p_out = self._draw(m.name, "out", k_out, m.out_features)
        p_in = self._draw(m.name, "in", k_in, m.d_in)
        return p_out.to(like.device, like.dtype), p_in.to(like.device, like.dtype)

    def capture(self, capture: BatchCapture, modules: Sequence[TrackedModule]) -> Grads:
        """(B, k_out, k_in) per layer: Σ_t (Π_out Ds_t)(Π_in ā_t)ᵀ, without forming DW; with
        a whitening, Π_out [(Q_Sᵀ DW Q_A) ⊘ √D] Π_inᵀ (DW formed for this batch only)."""
        if self.whitening is not None:
            return self.dense(capture.grads(), modules, query=False)
        out = {}
        for m in modules:
            x = capture[m.name]
            p_out, p_in = self.matrices(m, x.ds)
            out[m.name] = torch.bmm((x.ds @ p_out.T).transpose(1, 2), x.a @ p_in.T)
        return out

    def dense(self, grads: Grads, modules: Sequence[TrackedModule], query: bool = True) -> Grads:
        """Π_out X Π_inᵀ for (…, o, d_in) matrices X per layer (whitened first, if set: the
        query side ⊙ √D, the candidate side ⊘ √D)."""
        out = {}
        for m in modules:
            x = grads[m.name]
            if self.whitening is not None:
                x = self.whitening.apply(m.name, x, query)
            p_out, p_in = self.matrices(m, x)
            out[m.name] = p_out @ x @ p_in.T
        return out


@dataclass(frozen=True)
class ProjectedGradientMethod(GradientMethod):
    """A gradient method scored in a Kronecker-projected space:
    I(z, q) ≈ Σ_l ⟨Π_out P_l ∇m(q) Π_inᵀ, Π_out ∇ℓ(z)_l Π_inᵀ⟩ (unbiased; exact at full size
    with orthogonal projections)."""

    projection: KroneckerProjection = KroneckerProjection(64, 64)
    whiten: bool = True  # whiten both sides by the pre-training EK-FAC first (module docstring)
    dense_dot: ClassVar[bool] = False  # scored on projected gradients, not the dense ones

    def __post_init__(self) -> None:
        if self.normalise is not Normalise.NONE:
            raise ValueError("ProjectedGradientMethod supports normalise=Normalise.NONE only")

    def requires(self) -> frozenset[str]:
        return frozenset({"whitening"} if self.whiten else ())

    def projection_for(self, ctx: ScoringContext, settings) -> KroneckerProjection:
        """The projection, with the whitening of the candidate stage's curvature (damped as
        the method's candidate stage is) when `whiten`."""
        if not self.whiten:
            return self.projection
        stage = self.candidates_at
        white = Whitening.from_inverse(ctx.stage(stage).inverse(settings.damping(stage)))
        return replace(self.projection, whitening=white, _cache={})

    def raw_layer_scores(self, ctx, questions, doc_ids, settings, rank=None):
        """(Q, N, L) per-layer dots with the projected candidate gradients (the stage's
        store for this projection: cached on disk, keyed by the projection too)."""
        pre = self.preconditioned(ctx, questions, settings, rank)
        store = ctx.stage(self.candidates_at).store(
            projection=self.projection_for(ctx, settings))
        return store.scores(pre, ctx.candidates(doc_ids), by_module=True)


register(ProjectedGradientMethod(
    "multi_stage_projected", "Multi-stage, projected candidate gradients (64×64 per layer)",
    "the multi-stage score with candidate gradients stored as Π_out W(∇ℓ) Π_inᵀ (whitened by "
    "the pre-training EK-FAC, then a Kronecker random projection, LoGra-style; 64×64 per "
    "layer)", FT, PT, multi_stage_preconditioner,
    damped_stage=PT, uses_alpha=True))

"""Projected candidate gradients: a Kronecker random projection of each layer (LoGra-style).

Notebook 09 §Disk. A layer's per-document gradient DW = Σ_t Ds_t ā_tᵀ is an (o, d_in) matrix;
with random Π_in (k_in, d_in) and Π_out (k_out, o) the store keeps

    G̃ = Π_out DW Π_inᵀ = Σ_t (Π_out Ds_t)(Π_in ā_t)ᵀ        (k_out, k_in)

computed from the captured tokens (never forming DW), k_out·k_in numbers instead of o·d_in.
The query side is projected the same way, so a score is ⟨Π_out P_l Π_inᵀ, G̃_l⟩ with P_l the
full-dimensional preconditioned query gradient (EK-FAC in the full space). With
E[Π_inᵀ Π_in] = I and E[Π_outᵀ Π_out] = I (independent), the projected score is an unbiased
estimate of ⟨P_l, DW_l⟩ (Johnson–Lindenstrauss); its error shrinks as 1/√k.

Kinds: `orthogonal` (default): Π = √(d/k) · k orthonormal rows of a random rotation, so at
k = d it is an orthogonal matrix and the score is exact; `gaussian`: i.i.d. N(0, 1/k) entries
(TRAK-style). The matrices are drawn from `seed` and the layer name, so both sides and every
run agree. Registered as `multi_stage_projected` (k_in = k_out = 64).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch

from msif_lite.attribution.methods import (
    FT,
    PT,
    GradientMethod,
    Normalise,
    Stage,
    multi_stage_preconditioner,
    register,
)
from msif_lite.engine.capture import BatchCapture
from msif_lite.engine.gradstore import GradientStore
from msif_lite.engine.layers import Grads, TrackedModule

if TYPE_CHECKING:  # pragma: no cover
    from msif_lite.attribution.attributor import Attributor


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
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("k_in", "k_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KroneckerProjection.{name} must be an int >= 1, got {v!r}")
        object.__setattr__(self, "kind", ProjectionKind(self.kind))

    @property
    def fingerprint(self) -> str:
        return f"kron-{self.kind.value}-{self.k_in}x{self.k_out}-seed{self.seed}"

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
        """(B, k_out, k_in) per layer: Σ_t (Π_out Ds_t)(Π_in ā_t)ᵀ, without forming DW."""
        out = {}
        for m in modules:
            x = capture[m.name]
            p_out, p_in = self.matrices(m, x.ds)
            out[m.name] = torch.bmm((x.ds @ p_out.T).transpose(1, 2), x.a @ p_in.T)
        return out

    def dense(self, grads: Grads, modules: Sequence[TrackedModule]) -> Grads:
        """Π_out X Π_inᵀ for (…, o, d_in) matrices X per layer."""
        out = {}
        for m in modules:
            p_out, p_in = self.matrices(m, grads[m.name])
            out[m.name] = p_out @ grads[m.name] @ p_in.T
        return out


_STORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def projected_store(att: Attributor, stage: Stage, projection: KroneckerProjection
                    ) -> GradientStore:  # fmt: skip
    """The attributor's store of projected candidate gradients at `stage` (one per projection,
    cached on disk next to the dense ones, keyed by the projection too)."""
    stores = _STORES.setdefault(att, {})
    key = (stage, projection.fingerprint)
    if key not in stores:
        budget = getattr(att.config, "gradient_cache_gb", None)
        extra = {} if budget is None else {"disk_budget_bytes": budget * 1e9}
        stores[key] = GradientStore(
            att.stage_model(stage), att.task, att.stage_modules(stage), att.collate,
            att.cache / "grads", batch_size=att.config.batch_size,
            progress=att.config.progress, projection=projection, **extra)  # fmt: skip
    return stores[key]


@dataclass(frozen=True)
class ProjectedGradientMethod(GradientMethod):
    """A gradient method scored in a Kronecker-projected space:
    I(z, q) ≈ Σ_l ⟨Π_out P_l ∇m(q) Π_inᵀ, Π_out ∇ℓ(z)_l Π_inᵀ⟩ (unbiased; exact at full size
    with orthogonal projections)."""

    projection: KroneckerProjection = KroneckerProjection(64, 64)

    def __post_init__(self) -> None:
        if self.normalise is not Normalise.NONE:
            raise ValueError("ProjectedGradientMethod supports normalise=Normalise.NONE only")

    def layer_scores(self, att, questions, doc_ids, settings):
        pre = self.preconditioned(att, questions, settings)
        store = projected_store(att, self.candidates_at, self.projection)
        return store.scores(pre, att.candidates(doc_ids), by_module=True).double()


register(ProjectedGradientMethod(
    "multi_stage_projected", "Multi-stage, projected candidate gradients (64×64 per layer)",
    "the multi-stage score with candidate gradients stored as Π_out ∇ℓ Π_inᵀ (a Kronecker "
    "random projection, LoGra-style; 64×64 per layer)", FT, PT, multi_stage_preconditioner,
    damped_stage=PT, uses_alpha=True))

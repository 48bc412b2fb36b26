"""The diagonal GGN: G_l ≈ diag(D_l), the simplest curvature, added as one file (the way a
new approximation joins the registry). It is the Λ pass of notebook 04 §The eigenbasis, with
both eigenbases set to the identity.

Per tracked layer, from the per-sequence gradients DW_n = Σ_t Ds_{n,t} ā_{n,t}ᵀ (labels
drawn from the model for the "sampled" Fisher, the data labels for "empirical"):

    D_l = (1/N_seq) Σ_n DW_n^⊙2                                  (out, d_in)
    (diag(D_l) + λ_l I)⁻¹ V = V ⊘ (D_l + λ_l),    λ_l = 0.1 · mean(D_l) by default

D_l is exactly the diagonal of the (empirical or sampled) Fisher block of the layer: EK-FAC's
Λ with Q_S = I, Q_A = I. It ignores every correlation between two weights, so it is cheap
(one pass, no eigendecomposition, P numbers) and a yardstick for what the Kronecker
eigenbasis buys.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from msif_lite.engine.capture import capture_batch
from msif_lite.engine.curvature import Curvature, register
from msif_lite.engine.factors import FactorConfig, FitTimings
from msif_lite.engine.ihvp import Damping
from msif_lite.engine.layers import Grads, TrackedModule, check_finite, find_modules
from msif_lite.engine.storage import ArtifactKey, load_artifact, model_fingerprint, save_artifact
from msif_lite.engine.tasks import Fisher, Task


@dataclass(frozen=True)
class DiagonalFactors:
    """D_l per tracked layer, (out, d_in) each, and how they were fitted."""

    layers: tuple[tuple[str, torch.Tensor], ...]
    fisher: Fisher
    n_sequences: int
    config: FactorConfig
    timings: FitTimings = FitTimings()

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.layers)

    @staticmethod
    def _key(model: nn.Module, names, config: FactorConfig, data_fp: str) -> ArtifactKey:
        return ArtifactKey("diagonal_factors", model_fingerprint(model), data_fp,
                           config.settings(names))  # fmt: skip

    def save(self, path: str | Path, model: nn.Module, data_fingerprint: str) -> Path:
        """Written atomically, keyed by the whole model, the data and the config."""
        meta = {"fisher": self.fisher, "n_sequences": self.n_sequences}
        key = self._key(model, self.module_names, self.config, data_fingerprint)
        return save_artifact(path, dict(self.layers), key, meta)

    @classmethod
    def load(cls, path: str | Path, model: nn.Module, config: FactorConfig, data_fp: str,
             modules: Sequence[TrackedModule]) -> DiagonalFactors:  # fmt: skip
        names = [m.name for m in modules]
        tensors, meta = load_artifact(path, cls._key(model, names, config, data_fp))
        return cls(tuple((n, tensors[n]) for n in names), meta["fisher"],
                   meta["n_sequences"], config)  # fmt: skip

    def scaled(self, c: float) -> DiagonalFactors:
        """The factors of c·G."""
        if not c > 0:
            raise ValueError(f"scale the curvature by a positive factor, got {c}")
        return dataclasses.replace(self, layers=tuple((n, d * c) for n, d in self.layers))

    def to(self, dtype: torch.dtype) -> DiagonalFactors:
        return dataclasses.replace(self, layers=tuple((n, d.to(dtype)) for n, d in self.layers))


def fit_diagonal(model: nn.Module, task: Task, loader: Iterable, config: FactorConfig,
                 modules: Sequence[TrackedModule] | None = None) -> DiagonalFactors:  # fmt: skip
    """D_l = (1/N_seq) Σ_n DW_n^⊙2 over `loader`'s batches (one forward + backward each;
    sampled labels from one torch.Generator seeded with `config.seed`)."""
    t0 = time.perf_counter()
    modules = list(modules) if modules is not None else find_modules(
        model, config.include, config.exclude)  # fmt: skip
    gen = torch.Generator().manual_seed(config.seed)
    sums: list[torch.Tensor | None] = [None] * len(modules)
    n_seq = 0
    for j, batch in enumerate(loader):
        if config.max_batches is not None and j >= config.max_batches:
            break
        cap = capture_batch(model, task, batch, modules, fisher=config.fisher, generator=gen,
                            dtype=config.dtype_for(model))  # fmt: skip
        n_seq += cap.n_sequences
        for i, x in enumerate(cap.layers):
            sq = torch.bmm(x.ds.transpose(1, 2), x.a).square().sum(0)  # Σ_n DW_n^⊙2
            sums[i] = sq if sums[i] is None else sums[i] + sq
    if n_seq == 0:
        raise ValueError("the data loader yielded no batches; the diagonal needs an example.")
    layers = tuple((m.name, s / n_seq) for m, s in zip(modules, sums))
    check_finite(dict(layers), "diagonal curvature D")
    timings = FitTimings(lambda_s=time.perf_counter() - t0)
    return DiagonalFactors(layers, config.fisher, n_seq, config, timings)


class DiagonalIHVP:
    """V ↦ V ⊘ (D_l + λ_l) per layer; λ_l = `damping.value(D_l)`."""

    name = "diagonal"

    def __init__(self, factors: DiagonalFactors, damping: Damping = Damping()):  # noqa: B008
        self.factors, self.damping, self.fisher = factors, damping, factors.fisher
        self.module_names = factors.module_names
        self.damping_values = {n: damping.value(d) for n, d in factors.layers}
        self._denoms = {n: d + self.damping_values[n] for n, d in factors.layers}
        for n, denom in self._denoms.items():
            if not float(denom.min()) > 0:
                raise ValueError(f"layer {n!r}: D + λ has a zero entry (λ = "
                                 f"{self.damping_values[n]:g}); set Damping(absolute=...) > 0")

    def layer(self, name: str) -> DiagonalIHVP:
        one = dataclasses.replace(self.factors, layers=((name, dict(self.factors.layers)[name]),))
        return DiagonalIHVP(one, Damping(absolute=self.damping_values[name]))

    def apply(self, vectors: Grads) -> Grads:
        if set(vectors) != set(self.module_names):
            raise ValueError(f"diagonal: vectors for layers {sorted(vectors)}, factors for "
                             f"{sorted(self.module_names)}: use the factors' modules")
        return {k: v / self._denoms[k].to(v.device, v.dtype) for k, v in vectors.items()}

    def whitening_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(Q_S = I, Q_A = I, √(D + λ)) per layer (attribution.projected.Whitening)."""
        out = {}
        for n, denom in self._denoms.items():
            o, d = denom.shape
            out[n] = (torch.eye(o, dtype=denom.dtype), torch.eye(d, dtype=denom.dtype),
                      denom.sqrt())  # fmt: skip
        return out


register(Curvature("diagonal", "diagonal GGN: D = E_n[DW_n^⊙2], each weight on its own",
                   fit_diagonal, DiagonalIHVP, factors=DiagonalFactors, whitening=True))

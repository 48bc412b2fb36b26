"""K-FAC covariances, their eigenbases and the EK-FAC eigenvalue correction.

Notebook 03 §The Fisher block: per tracked layer,

    A = (1/N_tok) Σ_{n,t} ā_{n,t} ā_{n,t}ᵀ          (d_in, d_in), averaged over real tokens
    S = (1/N_seq) Σ_n Σ_t Ds_{n,t} Ds_{n,t}ᵀ        (out, out), token-summed per sequence,
                                                     averaged over sequences
    G_layer ≈ S ⊗ A     (in the kit's row-major `flatten`: torch.kron(S, A))

With one token per example S ⊗ A is exactly the Fisher block of a linear model; with T
tokens per sequence S carries the per-sequence scale of DW_n = Σ_t Ds_t ā_tᵀ.

Notebook 04 §The eigenbasis: A = Q_A diag(d_A) Q_Aᵀ, S = Q_S diag(d_S) Q_Sᵀ (eigh in
`eigh_dtype`, float64 by default; `eig_a`, `eig_s`) and

    Λ = (1/N_seq) Σ_n (Q_Sᵀ DW_n Q_A)^⊙2                (out, d_in)

computed from rotated tokens (Q_Aᵀ ā, Q_Sᵀ Ds) and one einsum per layer. When the captured
(ā, Ds) of the covariance pass fit in `cache_activations_mb`, the Λ pass reuses them instead
of a second forward + backward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from msif_lite.config import fields_help, help_field
from msif_lite.engine.layers import DEFAULT_EXCLUDE, TrackedModule, find_modules
from msif_lite.engine.storage import (
    ArtifactKey,
    config_fingerprint,
    load_artifact,
    model_fingerprint,
    save_artifact,
)
from msif_lite.engine.tasks import Fisher


@dataclass(frozen=True)
class FactorConfig:
    """Settings of a factor fit (frozen, validated; `FactorConfig.help()` prints the fields)."""

    fisher: Fisher = help_field(
        "'sampled': labels drawn from the model (true Fisher = GGN for softmax CE); "
        "'empirical': the data labels (empirical Fisher).", "sampled")
    seed: int = help_field("seed of the torch.Generator that draws sampled labels", 0)
    include: str | tuple[str, ...] | None = help_field(
        "regexes of layers to track (None: every linear layer); 'mlp'/'attention' shortcuts",
        None)
    exclude: str | tuple[str, ...] | None = help_field(
        "regexes of layers never tracked (default: the unembedding)", DEFAULT_EXCLUDE)
    max_batches: int | None = help_field("stop each pass after this many batches (None: all)", None)
    factor_dtype: Literal["float32", "float64", "auto"] = help_field(
        "dtype of the accumulated factors; 'auto' = the model's dtype, float32 for 16-bit "
        "models (eigendecompositions run in eigh_dtype)", "auto")
    progress: bool = help_field("show tqdm progress bars", True)
    cache_activations_mb: float = help_field(
        "memory budget (MiB) for keeping the covariance pass's (ā, Ds) to reuse in the Λ pass; "
        "0 always recomputes them", 2048.0, cli="--cache-activations-mb")
    cache_dtype: Literal["bfloat16"] | None = help_field(
        "keep the cached (ā, Ds) in this dtype (None: the factor dtype): 'bfloat16' halves "
        "the cache so twice the tokens fit cache_activations_mb and the Λ pass needs no second "
        "forward + backward; Λ then comes from bf16-rounded inputs (results/trace_speed.md "
        "measures the effect on scores)", None, cli="--cache-dtype")
    autocast_dtype: Literal["bfloat16", "float16"] | None = help_field(
        "run the forward/backward passes under torch.autocast in this dtype (None: off); the "
        "captured (ā, Ds) and the factors stay in factor_dtype, eigh in eigh_dtype", None)
    max_tokens: int | None = help_field(
        "token budget of each pass: stop before the batch after the one that reaches it "
        "(counted with task.token_mask; None: no budget)", None)
    eigh_dtype: Literal["float64", "float32"] = help_field(
        "precision of the eigendecompositions of A and S: 'float32' takes half the time on a "
        "CPU but mixes eigenvectors whose eigenvalues are below ~1e-7 of the largest: two "
        "fits that differ only by float32 round-off (batch size 1 vs 16, empirical Fisher, "
        "tests/test_refusals.py) gave scores 3.7 % apart with it, < 0.2 % with float64; "
        "results/trace_speed.md measures it on the real pair", "float64", cli="--eigh-dtype")
    eigh_workers: int | None = help_field(
        "eigendecompositions run this many layers at once, each on one thread (None: "
        "torch.get_num_threads() on a CPU, 1 on a GPU); the results do not depend on it", None,
        cli="--eigh-workers")
    offload: bool = help_field(
        "keep finished factors in CPU memory: A, S after the covariance pass; each layer's "
        "eigh on the model's device then back; Λ stored on the CPU (scoring moves a layer "
        "to the device only while applying it)", False)

    def __post_init__(self) -> None:
        if self.fisher not in ("sampled", "empirical"):
            raise ValueError(f"fisher must be 'sampled' or 'empirical', got {self.fisher!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.max_batches is not None and not (isinstance(self.max_batches, int)
                                                 and self.max_batches >= 1):
            raise ValueError(f"max_batches must be None or an int >= 1, not {self.max_batches!r}")
        if self.factor_dtype not in ("float32", "float64", "auto"):
            raise ValueError(
                f"factor_dtype must be 'float32', 'float64' or 'auto', got {self.factor_dtype!r}"
            )
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError("autocast_dtype must be None, 'bfloat16' or 'float16', "
                             f"got {self.autocast_dtype!r}")
        if self.max_tokens is not None and not (isinstance(self.max_tokens, int)
                                                and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be None or an int >= 1, not {self.max_tokens!r}")
        if self.cache_dtype not in (None, "bfloat16"):
            raise ValueError(f"cache_dtype must be None or 'bfloat16', got {self.cache_dtype!r}")
        if self.eigh_dtype not in ("float64", "float32"):
            raise ValueError(f"eigh_dtype must be 'float64' or 'float32', got {self.eigh_dtype!r}")
        if self.eigh_workers is not None and not (isinstance(self.eigh_workers, int)
                                                  and self.eigh_workers >= 1):  # fmt: skip
            raise ValueError("eigh_workers must be None (one per torch thread) or an int >= 1, "
                             f"got {self.eigh_workers!r}")
        if not self.cache_activations_mb >= 0:
            raise ValueError(f"cache_activations_mb must be >= 0, got {self.cache_activations_mb}")
        for name in ("include", "exclude"):  # lists → tuples, so the config stays hashable
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def help(cls) -> str:
        return fields_help(cls)

    def settings(self, module_names: Sequence[str]) -> str:
        """Fingerprint of what changes the factors' values (not progress bars or cache size)."""
        d = dataclasses.asdict(self)
        d.pop("progress")
        d.pop("cache_activations_mb")
        d.pop("offload")
        d.pop("eigh_workers")
        if d["eigh_dtype"] == "float64":  # the default: earlier caches stay valid
            d.pop("eigh_dtype")
        if d["cache_dtype"] is None:  # the default: earlier caches stay valid
            d.pop("cache_dtype")
        d["modules"] = list(module_names)
        return config_fingerprint(d)

    def dtype_for(self, model: nn.Module) -> torch.dtype:
        if self.factor_dtype != "auto":
            return getattr(torch, self.factor_dtype)
        p = next(model.parameters())
        return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


@dataclass(frozen=True)
class FitTimings:
    """Wall-clock seconds per fitting stage (NaN for a stage that did not run)."""

    covariance_s: float = float("nan")
    eigendecomposition_s: float = float("nan")
    lambda_s: float = float("nan")


@dataclass(frozen=True)
class KroneckerFactors:
    """One layer's K-FAC factors: A (d_in, d_in) and S (out, out)."""

    name: str
    A: torch.Tensor
    S: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.S.shape[0], self.A.shape[0])


@dataclass(frozen=True)
class EigenFactors:
    """One layer's eigenbases A = Q_A diag(eig_A) Q_Aᵀ, S = Q_S diag(eig_S) Q_Sᵀ and the
    EK-FAC eigenvalues `lam` (out, d_in), None until `fit_lambda` runs."""

    name: str
    q_a: torch.Tensor
    eig_a: torch.Tensor
    q_s: torch.Tensor
    eig_s: torch.Tensor
    lam: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q_s.shape[0], self.q_a.shape[0])

    def A(self) -> torch.Tensor:
        return (self.q_a * self.eig_a) @ self.q_a.T

    def S(self) -> torch.Tensor:
        return (self.q_s * self.eig_s) @ self.q_s.T


@dataclass(frozen=True)
class _Factors:
    """Shared record keeping and storage of KFACFactors / EKFACFactors."""

    layers: tuple
    fisher: Fisher
    n_sequences: int
    n_tokens: int
    config: FactorConfig
    timings: FitTimings = FitTimings()
    _KIND: ClassVar[str] = ""
    _TENSORS: ClassVar[tuple[str, ...]] = ()

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(x.name for x in self.layers)

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple(x.shape for x in self.layers)

    def layer(self, name: str):
        for x in self.layers:
            if x.name == name:
                return x
        raise KeyError(f"no factors for layer {name!r}; fitted layers: {self.module_names}")

    # ------------------------------------------------------------------ storage
    @classmethod
    def _key(cls, model, names, config: FactorConfig, data_fingerprint: str) -> ArtifactKey:
        fp = model_fingerprint(model)  # every weight and buffer, tracked or not
        return ArtifactKey(cls._KIND, fp, data_fingerprint, config.settings(names))

    def save(self, path: str | Path, model: nn.Module, data_fingerprint: str) -> Path:
        """Write the factors, keyed by the whole model (all weights and buffers), the data
        and the config."""
        tensors = {}
        for x in self.layers:
            for t in self._TENSORS:
                value = getattr(x, t)
                if value is not None:
                    tensors[f"{x.name}/{t}"] = value
        meta = {
            "fisher": self.fisher, "n_sequences": self.n_sequences, "n_tokens": self.n_tokens,
            "config": dataclasses.asdict(self.config), "timings": dataclasses.asdict(self.timings),
            "modules": list(self.module_names),
        }
        key = self._key(model, self.module_names, self.config, data_fingerprint)
        return save_artifact(path, tensors, key, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module,
        expect_config: FactorConfig,
        data_fingerprint: str,
        modules: Sequence[TrackedModule] | None = None,
    ):
        """Load factors, refusing (StaleArtifactError) ones fitted on another model, data or
        settings than `model`, `data_fingerprint` and `expect_config` describe."""
        if modules is None:
            modules = find_modules(model, expect_config.include, expect_config.exclude)
        names = [m.name for m in modules]
        tensors, meta = load_artifact(path, cls._key(model, names, expect_config, data_fingerprint))
        layers = []
        for n in names:
            kw = {t: tensors.get(f"{n}/{t}") for t in cls._TENSORS}
            layers.append(cls._LAYER(n, **kw))
        timings = FitTimings(**meta["timings"])
        return cls(tuple(layers), meta["fisher"], meta["n_sequences"], meta["n_tokens"],
                   expect_config, timings)


@dataclass(frozen=True)
class KFACFactors(_Factors):
    """K-FAC factors of all tracked layers (Notebook 03 §The Fisher block)."""

    layers: tuple[KroneckerFactors, ...]
    _KIND: ClassVar[str] = "kfac_factors"
    _TENSORS: ClassVar[tuple[str, ...]] = ("A", "S")
    _LAYER: ClassVar[type] = KroneckerFactors


@dataclass(frozen=True)
class EKFACFactors(_Factors):
    """Eigenbases (+ EK-FAC eigenvalues once fitted) of all tracked layers (Notebook 04)."""

    layers: tuple[EigenFactors, ...]
    _KIND: ClassVar[str] = "ekfac_factors"
    _TENSORS: ClassVar[tuple[str, ...]] = ("q_a", "eig_a", "q_s", "eig_s", "lam")
    _LAYER: ClassVar[type] = EigenFactors

    @property
    def has_lambda(self) -> bool:
        return all(x.lam is not None for x in self.layers)

    def scaled(self, c: float) -> EKFACFactors:
        """Factors of c·G: the eigenbases are unchanged, eig_s and Λ are multiplied by c (so
        K-FAC's d_S d_Aᵀ and EK-FAC's Λ both scale). Used to turn the fitted per-sequence G
        into the Hessian of a token-mean objective (`AttributionConfig.finetune_loss`)."""
        if not c > 0:
            raise ValueError(f"scale the curvature by a positive factor, got {c}")

        def mul(t):
            return None if t is None else t * c

        layers = tuple(EigenFactors(x.name, x.q_a, x.eig_a, x.q_s, mul(x.eig_s), mul(x.lam))
                       for x in self.layers)  # fmt: skip
        return dataclasses.replace(self, layers=layers)

    def to(self, dtype: torch.dtype) -> EKFACFactors:
        """The same factors in `dtype` (float64 keeps a tiny damping λ invertible)."""
        def cast(t):
            return None if t is None else t.to(dtype)

        layers = tuple(EigenFactors(x.name, cast(x.q_a), cast(x.eig_a), cast(x.q_s),
                                    cast(x.eig_s), cast(x.lam)) for x in self.layers)
        return dataclasses.replace(self, layers=layers)

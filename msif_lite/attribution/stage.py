"""One training stage as the methods see it (notebook 07 §The multi-stage formula): a model
(θ_pt or θ_ft), its tracked layers, the curvature fitted on the stage's data (cached on
disk), its candidate-gradient stores and the per-question and per-document memos.

The Attributor builds two, `Stage.PRETRAINED` (fitted on the pre-training documents) and
`Stage.FINETUNED` (on the fine-tuning pairs, with H_ft = c·G_ft for the fine-tune's loss
normalisation); TracIn builds one per checkpoint (no curvature). Both stages of a pair track
the same layer names (`checks.check_same_architecture`), so a gradient taken at one stage is
scored against the other's candidates as it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from msif_lite.attribution.config import AttributionConfig
from msif_lite.attribution.encoder import Encoder, QuestionLike
from msif_lite.attribution.settings import Stage
from msif_lite.engine.curvature import curvature
from msif_lite.engine.gradstore import Candidate, GradientStore, Projection
from msif_lite.engine.ihvp import Damping, IdentityIHVP, InverseHVP
from msif_lite.engine.inputs import length_order
from msif_lite.engine.layers import Grads, TrackedModule, find_modules
from msif_lite.engine.lowrank import LowRankGrads
from msif_lite.engine.scores import (
    grad_sq_norms,
    preconditioned_queries,
    query_gradient_norms,
    query_gradients,
    self_influence,
)
from msif_lite.engine.storage import ArtifactError, CorruptArtifactError, data_fingerprint


def fit_order(examples: Sequence[Candidate], config: AttributionConfig) -> list[Candidate]:
    """The order a stage's fit batches its data in: with `batch_order='length'` shortest to
    longest (`length_order`: less padding, the same factors up to which sampled label each
    token draws), else as given, and as given whenever a token or batch budget takes a
    prefix of it (FactorConfig.max_tokens, max_batches)."""
    f = config.factors
    if config.batch_order == "given" or f.max_tokens is not None or f.max_batches is not None:
        return list(examples)
    return [examples[i] for i in length_order([len(c.input_ids) for c in examples])]


class StageState:
    """A stage's model, layers, curvature, gradient stores and memos, each built once."""

    def __init__(self, stage: Stage, model: nn.Module, encoder: Encoder,
                 config: AttributionConfig,
                 fit_examples: Callable[[], Sequence[Candidate]] | None = None,
                 objective_scale: Callable[[], float] | None = None):  # fmt: skip
        fc = config.factors
        self.stage, self.model, self.encoder, self.config = stage, model, encoder, config
        self.modules: list[TrackedModule] = find_modules(model, fc.include, fc.exclude)
        self._fit_examples, self._objective_scale = fit_examples, objective_scale
        self._query_norms: dict[tuple[str, str], float] = {}
        self._norms: dict[str, float] = {}
        self._self_inf: dict[tuple, float] = {}
        self._stores: dict[tuple, GradientStore] = {}

    def with_model(self, model: nn.Module) -> StageState:
        """This stage (encoder, config, fit data, objective scale) on another model's weights,
        e.g. a checkpoint of the same run; its caches are its own."""
        return StageState(self.stage, model, self.encoder, self.config, self._fit_examples,
                          self._objective_scale)  # fmt: skip

    @property
    def task(self):
        return self.config.task

    @property
    def cache(self) -> Path:
        return Path(self.config.cache_dir)

    # ------------------------------------------------------------------ curvature
    @cached_property
    def factors(self):
        """The configured curvature's factors on this stage's data (cached on disk, keyed by
        the model's weights, the data and the fit settings), or None (no factors)."""
        curv = curvature(self.config.curvature)
        if not curv.needs_factors:
            return None
        if self._fit_examples is None:
            raise ValueError(f"the {self.stage.value} stage has no data to fit a curvature on")
        cfg, examples = self.config.factor_config(), fit_order(self._fit_examples(), self.config)
        data_fp = data_fingerprint([[list(c.input_ids), list(c.labels)] for c in examples]
                                   + [self.encoder.batch_size])  # label draws depend on it
        settings = cfg.settings([m.name for m in self.modules])[:12]
        name = f"{self.stage.value}-{curv.name}-{data_fp[:16]}-{settings}.safetensors"
        path = self.cache / "factors" / name
        try:
            return curv.load(path, self.model, cfg, data_fp, self.modules)
        except FileNotFoundError:
            pass
        except CorruptArtifactError as e:
            warnings.warn(f"{path} was corrupt ({e}); refitting it", stacklevel=3)
        except ArtifactError:
            pass  # another model / data / settings: refit and overwrite
        factors = curv.fit(self.model, self.task, self.encoder.batches(examples), cfg,
                           self.modules)  # fmt: skip
        factors.save(path, self.model, data_fp)
        return factors

    @cached_property
    def objective_scale(self) -> float:
        """c with H = c·G (1 unless the stage's objective averages differently, e.g. the
        fine-tune's token mean: `AttributionConfig.finetune_loss`)."""
        return 1.0 if self._objective_scale is None else self._objective_scale()

    def inverse(self, damping: Damping, float64: bool = False) -> InverseHVP:
        """(H + λI)⁻¹ with the configured curvature, H = c·G."""
        factors = self.factors
        if factors is not None and self.objective_scale != 1.0:
            factors = factors.scaled(self.objective_scale)
        if float64 and factors is not None:
            factors = factors.to(torch.float64)
        return curvature(self.config.curvature).inverse(factors, damping)

    # ------------------------------------------------------------------ candidate gradients
    def store(self, dtype: torch.dtype | None = None,
              projection: Projection | None = None) -> GradientStore:  # fmt: skip
        """The candidate-gradient store (one per dtype and projection; the one construction
        of a GradientStore from the config: disk budget, chunk, storage form, batch size,
        progress)."""
        key = (dtype, None if projection is None else projection.fingerprint)
        if key not in self._stores:
            c = self.config
            self._stores[key] = GradientStore(
                self.model, self.task, self.modules, self.encoder.collate,
                self.cache / "grads", batch_size=self.encoder.batch_size, dtype=dtype,
                progress=c.progress, projection=projection,
                disk_budget_bytes=c.gradient_cache_gb * 1e9,
                chunk_bytes=c.gradient_chunk_mb * 2**20, storage=c.gradient_storage,
                order=c.batch_order)  # fmt: skip
        return self._stores[key]

    def candidate_norms(self, candidates: Sequence[Candidate]) -> torch.Tensor:
        """‖∇ℓ(z)‖ over the tracked layers, (N,) float64 (memoised per document)."""
        todo = list({c.doc_id: c for c in candidates if c.doc_id not in self._norms}.values())
        if todo:
            self._norms.update(zip([c.doc_id for c in todo], self.store().norms(todo).tolist()))
        return torch.tensor([self._norms[c.doc_id] for c in candidates], dtype=torch.float64)

    def self_influence(self, candidates: Sequence[Candidate], damping: Damping,
                       float64: bool = False) -> torch.Tensor:  # fmt: skip
        """I(z, z) = ∇ℓ(z)ᵀ (H + λI)⁻¹ ∇ℓ(z), (N,) float64, memoised per document."""
        tag = (damping, float64)
        todo = list({c.doc_id: c for c in candidates
                     if (tag, c.doc_id) not in self._self_inf}.values())  # fmt: skip
        if todo:
            vals = self_influence(self.model, self.task, self.encoder.batches(todo),
                                  self.inverse(damping, float64), self.modules, progress=False)
            self._self_inf.update({(tag, c.doc_id): float(v) for c, v in zip(todo, vals)})
        return torch.tensor([self._self_inf[(tag, c.doc_id)] for c in candidates],
                            dtype=torch.float64)  # fmt: skip

    # ------------------------------------------------------------------ query gradients
    def query_grads(self, questions: Sequence[QuestionLike]) -> Grads:
        """∇m(q) per question, (Q, o, d_in) per tracked layer."""
        if not questions:
            raise ValueError("no questions given")
        return query_gradients(self.model, self.task, self.encoder.query_batch(questions),
                               self.modules, self.encoder.batch_size)  # fmt: skip

    def preconditioned(self, questions: Sequence[QuestionLike], ihvp: InverseHVP | None,
                       rank: int | None = None) -> Grads | LowRankGrads:  # fmt: skip
        """P_l = (H + λI)_l⁻¹ ∇m_l(q), one layer at a time (`engine.scores.
        preconditioned_queries`; rank-r truncated as soon as formed when `rank` is given);
        `ihvp=None`: P = I. The norms ‖∇m(q)‖ seen on the way are kept for `query_norms`."""
        if not questions:
            raise ValueError("no questions given")
        layer_sq: dict[str, torch.Tensor] = {}

        def keep(name: str, g: torch.Tensor) -> None:
            layer_sq[name] = grad_sq_norms(g)

        pre = preconditioned_queries(
            self.model, self.task, self.encoder.query_batch(questions), self.modules,
            ihvp if ihvp is not None else IdentityIHVP(), rank=rank,
            batch_size=self.encoder.batch_size, on_gradient=keep,
            progress=self.config.progress)  # fmt: skip
        for q, v in zip(questions, sum(layer_sq.values()).sqrt().tolist()):
            self._query_norms[(q.prompt, q.answer)] = v
        return pre

    def query_norms(self, questions: Sequence[QuestionLike]) -> torch.Tensor:
        """‖∇m(q)‖ over the tracked layers, (Q,) float64: those `preconditioned` saw
        (memoised per question), the others one layer at a time."""
        todo = [q for q in questions if (q.prompt, q.answer) not in self._query_norms]
        if todo:
            n = query_gradient_norms(self.model, self.task, self.encoder.query_batch(todo),
                                     self.modules, self.encoder.batch_size)  # fmt: skip
            self._query_norms.update(zip([(q.prompt, q.answer) for q in todo], n.tolist()))
        return torch.tensor([self._query_norms[(q.prompt, q.answer)] for q in questions],
                            dtype=torch.float64)  # fmt: skip

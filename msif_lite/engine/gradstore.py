"""Candidate gradients ∇ℓ(z, θ), cached on disk and reused across queries and methods.

Notebook 07 §Fact tracing: multi-stage, single-stage, gradient dot product
and cosine all dot preconditioned queries with the *same* candidate gradients at θ_pt, and
every damping or α in a sweep reuses them, so each document's gradient is computed once
and stored as an artifact keyed by (model weights, the document's tokens, the tracked
layers, dtype). A store for other weights or layers never loads it.

Scale (docs/design.md §Memory and disk at scale): a document's dense gradient has P numbers
(BLOOM-560m, MLP layers: 201M, 0.81 GB in float32), so N documents write N·P·e bytes. Above
`disk_budget_bytes` the store never writes them: `scores` and `norms` stream (each batch's
gradients are computed, used and dropped; nothing on disk, recomputed on the next call), and
`grads` refuses; streamed without a projection, a batch is captured once and scored one
layer's DW at a time (`engine.scores.pairwise_scores`; rank-r queries never form DW). A
`projection` (e.g. `attribution.projected.KroneckerProjection`) stores k_out·k_in numbers
per layer instead: G̃_l = Π_out DW_l Π_inᵀ = Σ_t (Π_out Ds_t)(Π_in ā_t)ᵀ, computed from the
captured tokens without forming DW_l, and the queries are projected the same way before the
dot. Scoring holds at most `chunk_bytes` of stored gradients at a time.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.capture import BatchCapture, capture_batch
from msif_lite.engine.layers import Grads, TrackedModule, check_finite
from msif_lite.engine.lowrank import LowRankGrads
from msif_lite.engine.storage import (
    ArtifactError,
    ArtifactKey,
    CorruptArtifactError,
    config_fingerprint,
    data_fingerprint,
    load_artifact,
    model_fingerprint,
    save_artifact,
)
from msif_lite.engine.tasks import Task, TokenBatch

DISK_BUDGET_BYTES = 20 * 10**9  # dense gradients beyond this are streamed, never written
CHUNK_BYTES = 2**30  # stored gradients held at once while scoring


class Projection(Protocol):
    """What a store needs of a gradient projection (`attribution.projected`)."""

    fingerprint: str

    def shape(self, module: TrackedModule) -> tuple[int, int]: ...

    def capture(self, capture: BatchCapture, modules: Sequence[TrackedModule]) -> Grads: ...

    def dense(self, grads: Grads, modules: Sequence[TrackedModule]) -> Grads: ...


class OverBudgetError(RuntimeError):
    """Raised when dense gradients of a candidate set would exceed the disk budget."""


@dataclass(frozen=True)
class Candidate:
    """One candidate document: its id and its tokenised (input_ids, labels)."""

    doc_id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


class GradientStore:
    """Per-document gradients DW_z = ∇_θ ℓ(z, θ) (per tracked layer) for one model.

    `collate` turns a list of Candidates into a TokenBatch (padding is exact: scores do not
    depend on it). Files live under `cache_dir/<model fingerprint>/<settings>/`. With a
    `projection`, the stored gradients are projected (see the module docstring); above
    `disk_budget_bytes` for a candidate set, `scores` and `norms` stream instead of writing.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        modules: Sequence[TrackedModule],
        collate: Callable[[Sequence[Candidate]], TokenBatch],
        cache_dir: str | Path,
        *,
        batch_size: int = 16,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        projection: Projection | None = None,
        disk_budget_bytes: float = DISK_BUDGET_BYTES,
        chunk_bytes: float = CHUNK_BYTES,
    ):
        self.model, self.task, self.modules, self.collate = model, task, list(modules), collate
        self.batch_size, self.progress = batch_size, progress
        self.dtype = dtype or next(model.parameters()).dtype
        self.projection = projection
        self.disk_budget_bytes, self.chunk_bytes = disk_budget_bytes, chunk_bytes
        self.model_fp = model_fingerprint(model)  # all weights and buffers, tracked or not
        settings = {"modules": [m.name for m in self.modules], "dtype": str(self.dtype)}
        if projection is not None:
            settings["projection"] = projection.fingerprint
        self.settings_fp = config_fingerprint(settings)
        self.root = Path(cache_dir) / self.model_fp[:20] / self.settings_fp[:12]
        self._memory: dict[str, Grads] = {}

    def _key(self, c: Candidate) -> ArtifactKey:
        data = data_fingerprint([c.doc_id, list(c.input_ids), list(c.labels)])
        return ArtifactKey("candidate-grads", self.model_fp, data, self.settings_fp)

    def _path(self, c: Candidate) -> Path:
        return self.root / (hashlib.sha256(c.doc_id.encode()).hexdigest()[:24] + ".safetensors")

    def _load(self, c: Candidate) -> Grads | None:
        path = self._path(c)
        if not path.exists():
            return None
        try:
            tensors, _ = load_artifact(path, self._key(c))
        except CorruptArtifactError as e:
            warnings.warn(f"{path} was corrupt ({e}); recomputing it (check the disk or the "
                          "copy of the cache)", stacklevel=3)  # fmt: skip
            return None
        except ArtifactError:
            return None  # computed for another model/settings: recomputed and overwritten
        return tensors

    def shape(self, m: TrackedModule) -> tuple[int, int]:
        """Shape of one document's stored gradient of layer m: (out, d_in), or projected."""
        return m.shape if self.projection is None else self.projection.shape(m)

    def bytes_per_document(self) -> int:
        """Σ_l numel_l · e: one document's file (without its small header)."""
        e = torch.empty((), dtype=self.dtype).element_size()
        return sum(a * b for a, b in map(self.shape, self.modules)) * e

    def streams(self, n_candidates: int) -> bool:
        """Whether `n_candidates` documents are over the disk budget (then never written)."""
        return n_candidates * self.bytes_per_document() > self.disk_budget_bytes

    def _compute(self, chunk: Sequence[Candidate]) -> Grads:
        """(B, *shape) per layer for a batch of documents: DW, or its projection."""
        cap = capture_batch(self.model, self.task, self.collate(chunk), self.modules)
        g = cap.grads() if self.projection is None else self.projection.capture(cap, self.modules)
        check_finite(g, "candidate gradients")
        return {k: v.detach().to(self.dtype) for k, v in g.items()}

    def _batches(self, candidates: Sequence[Candidate], desc: str) -> Iterator[Grads]:
        chunks = [candidates[i : i + self.batch_size]
                  for i in range(0, len(candidates), self.batch_size)]  # fmt: skip
        for chunk in tqdm(chunks, desc=desc, disable=not self.progress):
            yield self._compute(chunk)

    def grads(self, candidates: Sequence[Candidate], *, keep_in_memory: bool = False) -> Grads:
        """Stacked gradients (N, out, d_in) per layer, computing and saving the missing ones."""
        if len(candidates) == 0:
            raise ValueError(
                "the candidate set is empty: pass at least one document to score against."
            )
        if self.streams(len(candidates)):
            need = len(candidates) * self.bytes_per_document()
            raise OverBudgetError(
                f"{len(candidates)} documents' gradients need {need / 1e9:.1f} GB, over the disk "
                f"budget of {self.disk_budget_bytes / 1e9:.1f} GB: use scores()/norms() (they "
                "stream), fewer candidates, a projected method (e.g. method="
                "'multi_stage_projected'), or raise AttributionConfig.gradient_cache_gb.")
        # Written straight into the stacked output, one document at a time: a loaded file is
        # memory-mapped, so holding every document before stacking would hold the set twice.
        out = {m.name: torch.empty((len(candidates), *self.shape(m)), dtype=self.dtype)
               for m in self.modules}  # fmt: skip
        rows: dict[str, list[int]] = {}
        for i, c in enumerate(candidates):
            rows.setdefault(c.doc_id, []).append(i)

        def place(c: Candidate, g: Grads) -> None:
            for m in self.modules:
                out[m.name][rows[c.doc_id]] = g[m.name].to(self.dtype)
            if keep_in_memory:
                self._memory[c.doc_id] = g

        todo = []
        for c in {c.doc_id: c for c in candidates}.values():
            g = self._memory.get(c.doc_id) or self._load(c)
            if g is None:
                todo.append(c)
            else:
                place(c, g)
            del g
        chunks = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        show = self.progress and bool(chunks)  # nothing to compute: no empty bar
        for chunk in tqdm(chunks, desc="candidate gradients", disable=not show):
            g = self._compute(chunk)
            for i, c in enumerate(chunk):
                one = {k: v[i].contiguous().cpu() for k, v in g.items()}
                save_artifact(self._path(c), one, self._key(c), {"doc_id": c.doc_id})
                place(c, one)
            del g
        return out

    def _chunks(self, candidates: Sequence[Candidate], chunk: int | None, desc: str
                ) -> Iterator[Grads]:  # fmt: skip
        """Stored gradients `chunk` documents at a time (default: `chunk_bytes` worth), or
        streamed batch by batch when the set is over the disk budget."""
        if len(candidates) == 0:
            raise ValueError("the candidate set is empty: pass at least one document.")
        if self.streams(len(candidates)):
            yield from self._batches(candidates, desc + " (streamed: over the disk budget)")
            return
        n = chunk or max(1, int(self.chunk_bytes // self.bytes_per_document()))
        for i in range(0, len(candidates), n):
            yield self.grads(candidates[i : i + n])

    def project_queries(self, preconditioned: Grads | LowRankGrads) -> Grads | LowRankGrads:
        """The queries in the stored gradients' space: P itself, or Π_out P Π_inᵀ (formed one
        layer at a time; rank-r queries are multiplied out, L R, one layer at a time)."""
        if self.projection is None:
            return preconditioned
        return {m.name: self.projection.dense({m.name: _layer(preconditioned, m.name)},
                                              [m])[m.name] for m in self.modules}  # fmt: skip

    def scores(
        self,
        preconditioned: Grads | LowRankGrads,
        candidates: Sequence[Candidate],
        *,
        by_module: bool = False,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """I[q, n] = Σ_l ⟨P_{q,l}, DW_{n,l}⟩ (Q, N), or (Q, N, L) per layer with `by_module`
        (with a projection: Σ_l ⟨Π P_{q,l}, Π DW_{n,l}⟩). `preconditioned`: Grads, or rank-r
        `LowRankGrads` (engine.lowrank; P_l = L_l R_l, formed one layer at a time against
        stored gradients, never formed when streaming)."""
        if len(candidates) == 0:
            raise ValueError("the candidate set is empty: pass at least one document.")
        if self.projection is None and self.streams(len(candidates)):
            return self._streamed_scores(preconditioned, candidates, by_module)
        pre = self.project_queries(preconditioned)
        cols = []
        for g in self._chunks(candidates, chunk, "candidate scores"):
            per_layer = [
                torch.einsum("qoi,noi->qn",
                             _layer(pre, m.name).to(g[m.name].device, g[m.name].dtype),
                             g[m.name])
                for m in self.modules
            ]  # fmt: skip
            cols.append(torch.stack(per_layer, -1) if by_module else sum(per_layer))
            del g
        return torch.cat(cols, dim=1)

    def _streamed_scores(self, pre: Grads | LowRankGrads, candidates: Sequence[Candidate],
                         by_module: bool) -> torch.Tensor:  # fmt: skip
        """Over the disk budget: each batch captured once and scored layer by layer by
        `engine.scores.pairwise_scores` (one formula for streamed scores)."""
        from msif_lite.engine.ihvp import IdentityIHVP
        from msif_lite.engine.scores import pairwise_scores

        if isinstance(pre, LowRankGrads):
            if pre.left[self.modules[0].name].dtype != self.dtype:
                pre = LowRankGrads({k: v.to(self.dtype) for k, v in pre.left.items()},
                                   {k: v.to(self.dtype) for k, v in pre.right.items()}, pre.rank)
        elif pre[self.modules[0].name].dtype != self.dtype:
            pre = {k: v.to(self.dtype) for k, v in pre.items()}
        batches = self._batch_lists(candidates)
        return pairwise_scores(self.model, self.task, pre, (self.collate(c) for c in batches),
                               IdentityIHVP(), self.modules, by_module=by_module,
                               progress=self.progress, preconditioned=True,
                               total=len(batches))  # fmt: skip

    def _batch_lists(self, candidates: Sequence[Candidate]) -> list[Sequence[Candidate]]:
        return [candidates[i : i + self.batch_size]
                for i in range(0, len(candidates), self.batch_size)]  # fmt: skip

    def norms(self, candidates: Sequence[Candidate], chunk: int | None = None) -> torch.Tensor:
        """‖∇ℓ(z)‖ over the tracked layers, (N,), for gradient cosine (of the projected
        gradients with a projection); streamed, one layer's DW at a time."""
        from msif_lite.engine.scores import grad_sq_norms

        if self.projection is None and len(candidates) and self.streams(len(candidates)):
            out = []
            for c in tqdm(self._batch_lists(candidates), desc="candidate norms (streamed)",
                          disable=not self.progress):  # fmt: skip
                cap = capture_batch(self.model, self.task, self.collate(c), self.modules)
                sq = None
                for x in cap.layers:
                    dw = x.per_sequence_grad().to(self.dtype)
                    check_finite({x.name: dw}, "candidate gradients")
                    sq = grad_sq_norms(dw) if sq is None else sq + grad_sq_norms(dw)
                out.append(sq.sqrt())
            return torch.cat(out)
        out = [sum(v.double().pow(2).sum((-2, -1)) for v in g.values()).sqrt()
               for g in self._chunks(candidates, chunk, "candidate norms")]  # fmt: skip
        return torch.cat(out)


def _layer(pre: Grads | LowRankGrads, name: str) -> torch.Tensor:
    """One layer's (Q, o, d_in) query matrices: P_l, or L_l R_l for rank-r queries."""
    return pre.dense_layer(name) if isinstance(pre, LowRankGrads) else pre[name]

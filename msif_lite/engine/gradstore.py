"""Candidate gradients ∇ℓ(z, θ), cached on disk and reused across queries and methods.

Notebook 07 §Fact tracing: multi-stage, single-stage, gradient dot product and cosine all
dot preconditioned queries with the *same* candidate gradients at θ_pt, and every damping or
α in a sweep reuses them, so each document's gradient is computed once and stored as an
artifact keyed by (model weights, the document's tokens, the tracked layers, dtype, form).

Forms (`storage`): "dense" stores DW_l (o × d_in per layer); "tokens" the captured (ā, Ds) on
the document's T real tokens, DW_l = Dsᵀ ā exactly, T·(o + d_in) numbers per layer
(`engine.tokengrads`: scores Σ_t Ds_tᵀ P ā_t and norms without forming DW); "auto" (default)
picks tokens per document when T·Σ_l(o_l + d_l) < Σ_l o_l·d_l. The forms live in separate
directories and artifact kinds: neither is ever read as the other.

Scale (docs/design.md §Memory and disk at scale): N documents write N·P·e bytes dense
(BLOOM-560m MLPs: P = 201M, 0.81 GB each) or Σ_n T_n·Σ_l(o_l + d_l)·e as tokens. Above
`disk_budget_bytes` nothing is written: `scores` and `norms` stream (each batch computed, used
and dropped, one layer's DW at a time by `engine.scores.pairwise_scores`), `grads` refuses. A
`projection` (`attribution.projected`; `storage` ignored) stores Π_out DW_l Π_inᵀ = Σ_t
(Π_out Ds_t)(Π_in ā_t)ᵀ, k_out·k_in numbers per layer. Scoring holds at most `chunk_bytes`
of stored gradients at a time; documents are computed shortest first with `order="length"`.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine import tokengrads
from msif_lite.engine.capture import BatchCapture, capture_batch
from msif_lite.engine.inputs import length_order
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

DISK_BUDGET_BYTES = 20 * 10**9  # stored gradients beyond this are streamed, never written
CHUNK_BYTES = 2**30  # stored gradients held at once while scoring
STORAGE = ("auto", "dense", "tokens")  # GradientStore(storage=...)


class Projection(Protocol):
    """What a store needs of a gradient projection (`attribution.projected`)."""

    fingerprint: str
    def shape(self, module: TrackedModule) -> tuple[int, int]: ...
    def capture(self, capture: BatchCapture, modules: Sequence[TrackedModule]) -> Grads: ...
    def dense(self, grads: Grads, modules: Sequence[TrackedModule]) -> Grads: ...


class OverBudgetError(RuntimeError):
    """Raised when the stored gradients of a candidate set would exceed the disk budget."""


@dataclass(frozen=True)
class Candidate:
    """One candidate document: its id and its tokenised (input_ids, labels)."""

    doc_id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


class GradientStore:
    """Per-document gradients DW_z = ∇_θ ℓ(z, θ) (per tracked layer) for one model, under
    `cache_dir/<model fingerprint>/<settings and form>/`. `collate`: Candidates → TokenBatch
    (padding is exact). `storage`, `projection`, `disk_budget_bytes`, `order`: the module
    docstring (the budget counts each document's real bytes in its form)."""

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
        storage: Literal["auto", "dense", "tokens"] = "auto",
        order: Literal["length", "given"] = "given",
    ):
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {', '.join(map(repr, STORAGE))} (dense "
                             f"DW, token factors (ā, Ds), or the smaller), got {storage!r}")
        self.model, self.task, self.modules, self.collate = model, task, list(modules), collate
        self.batch_size, self.progress, self.storage = batch_size, progress, storage
        self.order = order  # how documents computed are batched (results are in input order)
        self.dtype = dtype or next(model.parameters()).dtype
        self.projection = projection
        self.disk_budget_bytes, self.chunk_bytes = disk_budget_bytes, chunk_bytes
        self.model_fp = model_fingerprint(model)  # all weights and buffers, tracked or not
        settings = {"modules": [m.name for m in self.modules], "dtype": str(self.dtype)}
        if projection is not None:
            settings["projection"] = projection.fingerprint
        self.settings_fp = config_fingerprint(settings)  # dense or projected
        self.token_settings_fp = config_fingerprint({**settings, "storage": "tokens"})
        base = Path(cache_dir) / self.model_fp[:20]
        self.root = base / self.settings_fp[:12]
        self.token_root = base / self.token_settings_fp[:12]
        self._memory: dict[str, dict[str, torch.Tensor]] = {}

    def form(self, c: Candidate) -> str:
        """How document c is stored: "projected", "dense" or "tokens"."""
        if self.projection is not None:
            return "projected"
        if self.storage != "auto":
            return self.storage
        return "tokens" if tokengrads.prefers_tokens(len(c.input_ids), self.modules) else "dense"

    def _key(self, c: Candidate) -> ArtifactKey:
        data = data_fingerprint([c.doc_id, list(c.input_ids), list(c.labels)])
        tokens = self.form(c) == "tokens"
        kind = "candidate-token-factors" if tokens else "candidate-grads"
        return ArtifactKey(kind, self.model_fp, data,
                           self.token_settings_fp if tokens else self.settings_fp)

    def _path(self, c: Candidate) -> Path:
        root = self.token_root if self.form(c) == "tokens" else self.root
        return root / (hashlib.sha256(c.doc_id.encode()).hexdigest()[:24] + ".safetensors")

    def _load(self, c: Candidate) -> dict[str, torch.Tensor] | None:
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
        """Shape of one document's dense gradient of layer m: (out, d_in), or projected."""
        return m.shape if self.projection is None else self.projection.shape(m)

    def bytes_per_document(self, candidate: Candidate | None = None) -> int:
        """One document's file without its header: Σ_l numel_l·e (dense or projected) or
        T·Σ_l(o_l + d_l)·e (tokens); without `candidate`, the dense (or projected) size."""
        e = torch.empty((), dtype=self.dtype).element_size()
        if candidate is not None and self.form(candidate) == "tokens":
            return tokengrads.token_numel(len(candidate.input_ids), self.modules) * e
        return sum(a * b for a, b in map(self.shape, self.modules)) * e

    def disk_bytes(self, candidates: Sequence[Candidate]) -> int:
        """The bytes the distinct documents of `candidates` write, each in its own form."""
        unique = {c.doc_id: c for c in candidates}.values()
        return sum(self.bytes_per_document(c) for c in unique)

    def streams(self, candidates: Sequence[Candidate] | int) -> bool:
        """Whether the candidates' stored gradients are over the disk budget (then never
        written). A count alone assumes the dense (or projected) size per document."""
        if isinstance(candidates, int):
            return candidates * self.bytes_per_document() > self.disk_budget_bytes
        return self.disk_bytes(candidates) > self.disk_budget_bytes

    def _compute(self, chunk: Sequence[Candidate]) -> Grads:
        """(B, *shape) per layer for a batch of documents: DW, or its projection."""
        cap = capture_batch(self.model, self.task, self.collate(chunk), self.modules)
        g = cap.grads() if self.projection is None else self.projection.capture(cap, self.modules)
        check_finite(g, "candidate gradients")
        return {k: v.detach().to(self.dtype) for k, v in g.items()}

    def _compute_docs(self, chunk: Sequence[Candidate]) -> list[dict[str, torch.Tensor]]:
        """Each document's stored tensors (its form's), from one capture of the batch."""
        if all(self.form(c) != "tokens" for c in chunk):
            g = self._compute(chunk)
            return [{k: v[i].contiguous().cpu() for k, v in g.items()} for i in range(len(chunk))]
        cap = capture_batch(self.model, self.task, self.collate(chunk), self.modules)
        return tokengrads.per_document(cap, [self.form(c) == "tokens" for c in chunk],
                                       self.dtype)  # fmt: skip

    def _fetch(self, candidates: Sequence[Candidate], desc: str
               ) -> Iterator[tuple[Candidate, dict[str, torch.Tensor]]]:  # fmt: skip
        """(c, its stored tensors) for each distinct document: from memory or disk, else
        computed batch by batch and written."""
        todo = []
        for c in {c.doc_id: c for c in candidates}.values():
            g = self._memory.get(c.doc_id) or self._load(c)
            if g is None:
                todo.append(c)
            else:
                yield c, g
            del g
        chunks = self._batch_lists([todo[i] for i in self._ordered(todo)])
        for chunk in tqdm(chunks, desc=desc, disable=not (self.progress and chunks)):
            for c, one in zip(chunk, self._compute_docs(chunk)):
                save_artifact(self._path(c), one, self._key(c), {"doc_id": c.doc_id})
                yield c, one

    def _split(self, candidates: Sequence[Candidate]) -> tuple[list[int], list[int]]:
        """Positions of the token-factored documents, and of the others."""
        tok = [self.form(c) == "tokens" for c in candidates]
        return [i for i, t in enumerate(tok) if t], [i for i, t in enumerate(tok) if not t]

    def grads(self, candidates: Sequence[Candidate], *, keep_in_memory: bool = False) -> Grads:
        """Stacked dense (or projected) gradients (N, out, d_in) per layer, computing and saving
        the missing ones; token factors are multiplied out, DW = Dsᵀ ā (dense output)."""
        if len(candidates) == 0:
            raise ValueError("the candidate set is empty: pass at least one document.")
        if self.streams(candidates):
            need = self.disk_bytes(candidates)
            raise OverBudgetError(
                f"{len(candidates)} documents' gradients need {need / 1e9:.1f} GB, over the disk "
                f"budget of {self.disk_budget_bytes / 1e9:.1f} GB: use scores()/norms() (they "
                "stream), fewer candidates, a projected method (e.g. method="
                "'multi_stage_projected'), gradient_storage='auto' or 'tokens' (exact, smaller "
                "for short documents), or raise AttributionConfig.gradient_cache_gb.")
        # Written straight into the stacked output, one document at a time: a loaded file is
        # memory-mapped, so holding every document before stacking would hold the set twice.
        out = {m.name: torch.empty((len(candidates), *self.shape(m)), dtype=self.dtype)
               for m in self.modules}  # fmt: skip
        rows: dict[str, list[int]] = {}
        for i, c in enumerate(candidates):
            rows.setdefault(c.doc_id, []).append(i)
        for c, stored in self._fetch(candidates, "candidate gradients"):
            g = tokengrads.to_dense(stored, self.modules) if self.form(c) == "tokens" else stored
            for m in self.modules:
                out[m.name][rows[c.doc_id]] = g[m.name].to(self.dtype)
            if keep_in_memory:
                self._memory[c.doc_id] = stored
            del g, stored
        return out

    def _chunks(self, candidates: Sequence[Candidate], chunk: int | None, desc: str
                ) -> Iterator[Grads]:  # fmt: skip
        """Stored dense (or projected) gradients `chunk` documents at a time (default:
        `chunk_bytes` worth), or batch by batch when over the disk budget (projected)."""
        if self.streams(candidates):
            for b in tqdm(self._batch_lists(candidates), disable=not self.progress,
                          desc=desc + " (streamed: over the disk budget)"):  # fmt: skip
                yield self._compute(b)
            return
        n = chunk or max(1, int(self.chunk_bytes // self.bytes_per_document()))
        for i in range(0, len(candidates), n):
            yield self.grads(candidates[i : i + n])

    def _token_chunks(self, candidates: Sequence[Candidate], chunk: int | None
                      ) -> Iterator[tuple[list[int], list[tokengrads.Doc]]]:  # fmt: skip
        """(positions, factors) of token-factored documents, `chunk` documents (default:
        `chunk_bytes` of factors) at a time."""
        sizes = [1] * len(candidates) if chunk else [self.bytes_per_document(c) for c in candidates]
        for pos in tokengrads.chunks(sizes, chunk or self.chunk_bytes):
            part = [candidates[i] for i in pos]
            docs = {c.doc_id: g for c, g in self._fetch(part, "candidate token factors")}
            yield pos, [docs[c.doc_id] for c in part]
            del docs  # one chunk held at a time (the caller drops its list too)

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
        (with a projection: Σ_l ⟨Π P_{q,l}, Π DW_{n,l}⟩; token-factored documents: Σ_l Σ_t
        Ds_tᵀ P_{q,l} ā_t, DW never formed). `preconditioned`: Grads, or rank-r `LowRankGrads`
        (engine.lowrank; P_l = L_l R_l, formed one layer at a time against stored dense
        gradients, never against token factors or when streaming). `chunk`: documents held
        at once (default: `chunk_bytes` of stored gradients)."""
        if len(candidates) == 0:
            raise ValueError("the candidate set is empty: pass at least one document.")
        if self.projection is None and self.streams(candidates):
            return self._streamed_scores(preconditioned, candidates, by_module)
        pre = self.project_queries(preconditioned)
        tok, rest = self._split(candidates)
        parts = []
        if rest:
            parts.append((rest, self._stored_scores(pre, [candidates[i] for i in rest],
                                                    by_module, chunk)))  # fmt: skip
        for pos, docs in self._token_chunks([candidates[i] for i in tok], chunk):
            per_layer = [tokengrads.layer_scores(pre, m, docs, self.chunk_bytes).cpu()
                         for m in self.modules]  # fmt: skip
            parts.append(([tok[p] for p in pos],
                          torch.stack(per_layer, -1) if by_module else sum(per_layer)))
            del docs
        first = parts[0][1]
        if len(parts) == 1:  # one part: the positions in order
            return first
        out = torch.empty((first.shape[0], len(candidates), *first.shape[2:]), dtype=first.dtype)
        for pos, s in parts:
            out[:, pos] = s
        return out

    def _stored_scores(self, pre: Grads | LowRankGrads, candidates: Sequence[Candidate],
                       by_module: bool, chunk: int | None) -> torch.Tensor:  # fmt: skip
        """`scores` against stored dense (or projected) gradients, chunk by chunk."""
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
        perm = self._ordered(candidates)
        batches = self._batch_lists([candidates[i] for i in perm])
        out = pairwise_scores(self.model, self.task, pre, (self.collate(c) for c in batches),
                              IdentityIHVP(), self.modules, by_module=by_module,
                              progress=self.progress, preconditioned=True,
                              total=len(batches))  # fmt: skip
        return out[:, torch.tensor(perm).argsort()]  # back to the candidates' order

    def _ordered(self, candidates: Sequence[Candidate]) -> list[int]:
        """Positions in the order documents are batched: shortest first (`order="length"`:
        little padding) or as given."""
        if self.order == "given":
            return list(range(len(candidates)))
        return length_order([len(c.input_ids) for c in candidates])

    def _batch_lists(self, candidates: Sequence[Candidate]) -> list[Sequence[Candidate]]:
        return [candidates[i : i + self.batch_size]
                for i in range(0, len(candidates), self.batch_size)]  # fmt: skip

    def norms(self, candidates: Sequence[Candidate], chunk: int | None = None) -> torch.Tensor:
        """‖∇ℓ(z)‖ over the tracked layers, (N,) float64, for gradient cosine (of the
        projected gradients with a projection; token factors: ‖DW‖² = Σ_{t,t'} (Ds Dsᵀ ⊙
        ā āᵀ)_{t t'}, exact); streamed, one layer's DW at a time."""
        from msif_lite.engine.scores import grad_sq_norms

        if len(candidates) == 0:
            raise ValueError("the candidate set is empty: pass at least one document.")
        if self.projection is None and self.streams(candidates):
            out, perm = [], self._ordered(candidates)
            for c in tqdm(self._batch_lists([candidates[i] for i in perm]),
                          desc="candidate norms (streamed)", disable=not self.progress):
                cap = capture_batch(self.model, self.task, self.collate(c), self.modules)
                sq = None
                for x in cap.layers:
                    dw = x.per_sequence_grad().to(self.dtype)
                    check_finite({x.name: dw}, "candidate gradients")
                    sq = grad_sq_norms(dw) if sq is None else sq + grad_sq_norms(dw)
                out.append(sq.sqrt())
            return torch.cat(out)[torch.tensor(perm).argsort()]
        tok, rest = self._split(candidates)
        out = torch.empty(len(candidates), dtype=torch.float64)
        if rest:
            out[rest] = torch.cat([
                sum(v.double().pow(2).sum((-2, -1)) for v in g.values()).sqrt()
                for g in self._chunks([candidates[i] for i in rest], chunk, "candidate norms")])
        for pos, docs in self._token_chunks([candidates[i] for i in tok], chunk):
            out[[tok[p] for p in pos]] = torch.stack(
                [tokengrads.sq_norm(d, self.modules) for d in docs]).sqrt()
            del docs
        return out


def _layer(pre: Grads | LowRankGrads, name: str) -> torch.Tensor:
    """One layer's (Q, o, d_in) query matrices: P_l, or L_l R_l for rank-r queries."""
    return pre.dense_layer(name) if isinstance(pre, LowRankGrads) else pre[name]

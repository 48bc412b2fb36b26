"""Candidate gradients ∇ℓ(z, θ), cached on disk and reused across queries and methods.

Notebook 07 §Fact tracing: multi-stage, single-stage, gradient dot product
and cosine all dot preconditioned queries with the *same* candidate gradients at θ_pt, and
every damping or α in a sweep reuses them, so each document's gradient is computed once
and stored as an artifact keyed by (model weights, the document's tokens, the tracked
layers, dtype). A store for other weights or layers never loads it.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.capture import per_sequence_grads
from msif_lite.engine.layers import Grads, TrackedModule, check_finite
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


@dataclass(frozen=True)
class Candidate:
    """One candidate document: its id and its tokenised (input_ids, labels)."""

    doc_id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


class GradientStore:
    """Per-document gradients DW_z = ∇_θ ℓ(z, θ) (per tracked layer) for one model.

    `collate` turns a list of Candidates into a TokenBatch (padding is exact: scores do not
    depend on it). Files live under `cache_dir/<model fingerprint>/<settings>/`.
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
    ):
        self.model, self.task, self.modules, self.collate = model, task, list(modules), collate
        self.batch_size, self.progress = batch_size, progress
        self.dtype = dtype or next(model.parameters()).dtype
        self.model_fp = model_fingerprint(model)  # all weights and buffers, tracked or not
        self.settings_fp = config_fingerprint(
            {"modules": [m.name for m in self.modules], "dtype": str(self.dtype)}
        )
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

    def grads(self, candidates: Sequence[Candidate], *, keep_in_memory: bool = False) -> Grads:
        """Stacked gradients (N, out, d_in) per layer, computing and saving the missing ones."""
        if len(candidates) == 0:
            raise ValueError(
                "the candidate set is empty: pass at least one document to score against."
            )
        found: dict[str, Grads] = {}
        todo = []
        for c in candidates:
            g = self._memory.get(c.doc_id) or self._load(c)
            if g is None:
                todo.append(c)
            else:
                found[c.doc_id] = g
        chunks = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        for chunk in tqdm(chunks, desc="candidate gradients", disable=not self.progress):
            g = per_sequence_grads(self.model, self.task, self.collate(chunk), self.modules)
            check_finite(g, "candidate gradients")
            for i, c in enumerate(chunk):
                one = {k: v[i].detach().to(self.dtype).contiguous().cpu() for k, v in g.items()}
                save_artifact(self._path(c), one, self._key(c), {"doc_id": c.doc_id})
                found[c.doc_id] = one
        if keep_in_memory:
            self._memory.update(found)
        return {m.name: torch.stack([found[c.doc_id][m.name] for c in candidates]) for m in
                self.modules}  # fmt: skip

    def scores(
        self,
        preconditioned: Grads,
        candidates: Sequence[Candidate],
        *,
        by_module: bool = False,
        chunk: int = 256,
    ) -> torch.Tensor:
        """I[q, n] = Σ_l ⟨P_{q,l}, DW_{n,l}⟩ (Q, N), or (Q, N, L) per layer with `by_module`."""
        cols = []
        for i in range(0, len(candidates), chunk):
            g = self.grads(candidates[i : i + chunk])
            per_layer = [
                torch.einsum("qoi,noi->qn", preconditioned[m.name].to(g[m.name].dtype), g[m.name])
                for m in self.modules
            ]
            cols.append(torch.stack(per_layer, -1) if by_module else sum(per_layer))
        if not cols:
            raise ValueError("the candidate set is empty: pass at least one document.")
        return torch.cat(cols, dim=1)

    def norms(self, candidates: Sequence[Candidate], chunk: int = 256) -> torch.Tensor:
        """‖∇ℓ(z)‖ over the tracked layers, (N,), for gradient cosine."""
        out = []
        for i in range(0, len(candidates), chunk):
            g = self.grads(candidates[i : i + chunk])
            out.append(sum(v.double().pow(2).sum((-2, -1)) for v in g.values()).sqrt())
        return torch.cat(out)

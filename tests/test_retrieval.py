"""Tests for msif_lite.attribution.retrieval (Notebook 08); offline, small corpora."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from msif_lite.attribution import retrieval as R  # noqa: E402
from msif_lite.engine.storage import StaleArtifactError  # noqa: E402

PEOPLE = ["Alvena Torsk", "Brimo Kallert", "Cedrina Vohl", "Dastan Mirewell", "Elsko Prandt",
          "Fenna Quillory", "Gorim Ashvale", "Halvie Denstrom", "Ixel Barrowind", "Jorund Faye",
          "Kesti Lumbrick", "Lorcan Ythe", "Mirela Osgard", "Nils Trevane", "Orla Wendmark",
          "Petrik Saule", "Quenna Hollis", "Rask Emberlee", "Sabine Orrow", "Tobin Velkas",
          "Ulla Strand", "Varo Kestrel", "Wynne Carraway", "Xavi Dunmore", "Yselle Brack"]
CITIES = ["Quellmoor", "Ostravel", "Pellingford", "Durnhaven", "Saltmere"]
JOBS = ["glassblower", "astronomer", "ferry captain", "beekeeper", "violin maker"]


def make_corpus() -> tuple[list[str], list[str]]:
    """50 sentences: each fictional person's birthplace and job."""
    ids, texts = [], []
    for i, p in enumerate(PEOPLE):
        ids += [f"born-{i}", f"job-{i}"]
        texts += [f"{p} was born in the city of {CITIES[i % 5]}.",
                  f"{p} works as a {JOBS[(i * 2) % 5]} in {CITIES[(i + 2) % 5]}."]
    return ids, texts


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def embedder():
    return R.load_embedder(device="cpu")


@pytest.fixture(scope="module")
def emb_index(corpus, embedder):
    return R.EmbeddingIndex(*corpus, embedder=embedder, progress=False)


def test_embeddings_normalised_and_deterministic(embedder, corpus):
    e1 = R.embed_texts(embedder, corpus[1][:10], progress=False)
    e2 = R.embed_texts(embedder, corpus[1][:10], batch_size=3, progress=False)
    assert e1.shape == (10, 384) and e1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e1, e2, atol=1e-5)
    np.testing.assert_array_equal(e1, R.embed_texts(embedder, corpus[1][:10], progress=False))


PARAPHRASES = [("Where did Dastan Mirewell come into the world?", "born-3"),
               ("What is Orla Wendmark's profession?", "job-14"),
               ("Which town is the birthplace of Xavi Dunmore?", "born-23")]


@pytest.mark.parametrize("query,source", PARAPHRASES)
def test_paraphrase_top3_embedding(emb_index, query, source):
    hits = emb_index.search([query], k=3)[0]
    assert source in [d for d, _ in hits]
    assert all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))


@pytest.mark.parametrize("query,source", PARAPHRASES)
def test_paraphrase_top3_bm25(corpus, query, source):
    bm = R.BM25Index(*corpus)
    hits = bm.search(query, k=3)
    assert source in [d for d, _ in hits]
    assert bm.search_many([query], 3)[0] == hits


def test_scores_match_search(emb_index, corpus):
    q = PARAPHRASES[0][0]
    hits = emb_index.search([q], k=5)[0]
    ids = [d for d, _ in hits]
    np.testing.assert_allclose(emb_index.scores(q, ids), [s for _, s in hits], atol=1e-5)
    bm = R.BM25Index(*corpus)
    bhits = bm.search(q, k=5)
    np.testing.assert_allclose(bm.scores(q, [d for d, _ in bhits]), [s for _, s in bhits])
    with pytest.raises(KeyError, match="nope"):
        emb_index.scores(q, ["nope"])
    with pytest.raises(KeyError, match="nope"):
        bm.scores(q, ["nope"])


def test_k_clipped_to_corpus(emb_index, corpus):
    assert len(emb_index.search(["Saltmere"], k=1000)[0]) == 50
    assert len(R.BM25Index(*corpus).search("Saltmere", k=1000)) == 50


def test_bm25_all_stopword_query_scores_zero(corpus):
    assert not R.BM25Index(*corpus).scores("the of and", corpus[0][:4]).any()


def test_save_load_round_trip(tmp_path, emb_index, corpus, embedder):
    emb_index.save(tmp_path)
    assert json.loads((tmp_path / R.MANIFEST_FILE).read_text())["embedder"] == R.EMBEDDER_NAME
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    loaded = R.EmbeddingIndex.load(tmp_path, *corpus, embedder=embedder)
    queries = [q for q, _ in PARAPHRASES]
    assert loaded.search(queries, 10) == emb_index.search(queries, 10)


def test_stale_load_refused_and_rebuilt(tmp_path, emb_index, corpus, embedder):
    emb_index.save(tmp_path)
    ids, texts = corpus
    texts2 = texts[:-1] + ["Yselle Brack works as a lighthouse keeper in Ostravel."]
    with pytest.raises(StaleArtifactError, match="different corpus.*rebuild"):
        R.EmbeddingIndex.load(tmp_path, ids, texts2, embedder=embedder)
    rebuilt = R.EmbeddingIndex.build_or_load(tmp_path, ids, texts2, embedder=embedder,
                                             progress=False)
    assert rebuilt.search(["Who keeps a lighthouse?"], 1)[0][0][0] == "job-24"
    again = R.EmbeddingIndex.load(tmp_path, ids, texts2, embedder=embedder)  # now fresh
    assert again.corpus_hash == R.corpus_hash(ids, texts2)


def test_build_or_load_missing_dir(tmp_path, corpus, embedder):
    idx = R.EmbeddingIndex.build_or_load(tmp_path / "new", corpus[0][:5], corpus[1][:5],
                                         embedder=embedder, progress=False)
    assert len(idx) == 5 and (tmp_path / "new" / R.INDEX_FILE).is_file()


def test_recall_at_k_hand_computed():
    retrieved = [["a", "b", "c", "d"], ["x", "y", "z", "w"]]
    true = [{"a", "d"}, {"w", "q", "x"}]
    # q1: k=1 -> 1/2, k=2 -> 1/2, k=4 -> 2/2; q2: k=1 -> 1/3, k=2 -> 1/3, k=4 -> 2/3
    r = R.recall_at_k(retrieved, true, ks=(1, 2, 4, 10))
    assert r == pytest.approx({1: (1 / 2 + 1 / 3) / 2, 2: (1 / 2 + 1 / 3) / 2,
                               4: (1 + 2 / 3) / 2, 10: (1 + 2 / 3) / 2})
    assert R.recall_at_k([["a"]], [{"a"}]) == {10: 1.0, 50: 1.0, 100: 1.0, 500: 1.0}
    assert R.recall_at_k([["b"]], [{"a"}], ks=(1,)) == {1: 0.0}


def test_plot_recall_curve():
    from matplotlib.figure import Figure

    fig = R.plot_recall_curve({"embedding": {10: 0.5, 100: 0.9}, "bm25": {10: 0.4, 100: 0.8}})
    ax = fig.axes[0]
    assert isinstance(fig, Figure)
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert ax.get_xscale() == "log" and len(ax.get_lines()) == 2


def test_empty_inputs_raise(emb_index, embedder):
    with pytest.raises(ValueError, match="empty corpus"):
        R.BM25Index([], [])
    with pytest.raises(ValueError, match="empty corpus"):
        R.EmbeddingIndex([], [], embedder=embedder)
    with pytest.raises(ValueError, match="empty query"):
        emb_index.search([], 3)
    with pytest.raises(TypeError, match="list of queries"):
        emb_index.search("Saltmere", 3)
    with pytest.raises(ValueError):
        R.embed_texts(embedder, [])
    with pytest.raises(ValueError, match="k must be"):
        emb_index.search(["Saltmere"], 0)
    with pytest.raises(ValueError):
        R.recall_at_k([], [])
    with pytest.raises(ValueError, match="no true sources"):
        R.recall_at_k([["a"]], [set()])
    with pytest.raises(ValueError, match="differ in length"):
        R.BM25Index(["a"], ["x", "y"])
    with pytest.raises(ValueError, match="unique"):
        R.BM25Index(["a", "a"], ["x", "y"])

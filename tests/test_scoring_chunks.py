"""`Attributor.scores` preconditions its queries one layer at a time (issue 16's scoring
peak): the same scores as the dense path it replaced (all layers' ∇m, then P, then the
store), for multi-stage, the gradient dot product, the cosine and rank-r queries, from
stored and from streamed candidate gradients; the inverse only ever sees one layer, a rank-r
layer's dense P is gone before the next layer starts, and the query norms are reused.

Float64 copies of the tiny pipeline's models: agreement to rtol 1e-9 (atol 1e-9 of the
largest score).
"""

from __future__ import annotations

import copy
import gc
import weakref
from dataclasses import replace

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution import stage as attributor_module
from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import METHODS, Stage
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.lowrank import LowRankGrads, truncate
from msif_lite.engine.multistage import MultiStageIHVP
from msif_lite.engine.scores import precondition

RANK = 3


def _make(s, cache, **cfg) -> Attributor:
    pt, ft = copy.deepcopy(s.pretrained).double(), copy.deepcopy(s.finetuned).double()
    return Attributor(pt, ft, s.tokenizer,
                      [(d.doc_id, d.text) for d in s.world.documents[:12]],
                      [(p.prompt, p.answer) for p in s.world.finetune_qa[:16]],
                      AttributionConfig(cache_dir=str(cache), progress=False, batch_size=4,
                                        factors=FactorConfig(max_batches=2), **cfg),
                      alpha=s.alpha)  # fmt: skip


@pytest.fixture(scope="module")
def atts(tmp_path_factory):
    """(stored, streamed): the same pipeline, candidates cached on disk or over the budget."""
    root = build_tiny_shipped(tmp_path_factory.mktemp("chunks"))
    s = load_tiny(root)
    stored = _make(s, root / "cache")
    streamed = _make(s, root / "cache", gradient_cache_gb=1e-9)
    assert not stored.store("pretrained").streams(12) and streamed.store("pretrained").streams(12)
    return stored, streamed


def _q(prompts=(("Ludrur Draethund", "Narvosk"), ("Kexynd Lyzol", "Lumora"),
                ("Ysolde Vantre", "Narvosk"))):  # fmt: skip
    return [type("Q", (), {"prompt": f"Question: Where was {n} born?\nAnswer:", "answer": a})()
            for n, a in prompts]  # fmt: skip


def dense_path(att: Attributor, name: str, qs, docs, rank: int | None) -> torch.Tensor:
    """The path `Attributor.scores` had before: every layer's ∇m first, then P of all layers
    (kept together), then (for rank r) truncated, then dotted with the stored gradients."""
    m = METHODS[name]
    qg = att.query_grads(qs, m.query_at)
    pre = qg if m.preconditioner is None else precondition(qg, m.preconditioner(att, att.settings))
    if rank is not None:
        pre = truncate(pre, rank).dense()
    layers = att.store(m.candidates_at).scores(pre, att.candidates(docs), by_module=True).double()
    if m.normalise.value == "unit":
        qn = sum(v.double().pow(2).sum((-2, -1)) for v in qg.values()).sqrt()
        dn = att.candidate_norms(docs, m.candidates_at)
        layers = layers / (qn[:, None] * dn[None, :])[..., None]
    return (layers * m.layer_mask(att)).sum(-1)


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))


@pytest.mark.parametrize("rank", [None, RANK])
@pytest.mark.parametrize("method", ["multi_stage", "grad_dot", "grad_cosine", "multi_stage_mlp"])
def test_layer_by_layer_scores_equal_the_dense_path(atts, method, rank):
    stored, streamed = atts
    qs, docs = _q(), stored.doc_ids
    want = dense_path(stored, method, qs, docs, rank)
    assert want.shape == (3, 12) and float(want.abs().max()) > 0
    for att in (stored, streamed):
        _close(att.scores(method, qs, docs, query_rank=rank), want)
        per_layer = att.scores(method, qs, docs, query_rank=rank, by_module=True)
        assert per_layer.shape == (3, 12, len(att.modules))
        _close(per_layer.sum(-1), want)
    if rank is not None:  # a real truncation: differs from full rank
        full = dense_path(stored, method, qs, docs, None)
        assert float((full - want).abs().max()) > 1e-6 * float(full.abs().max())


def test_the_inverse_sees_one_layer_and_truncated_layers_are_dropped(atts, monkeypatch):
    """MultiStageIHVP.apply is called once per layer with that layer only; with a rank, the
    dense P of layer l is freed before layer l + 1 is preconditioned; at full rank, the dense
    ∇m of layer l is freed (only P is kept)."""
    stored, _ = atts
    calls: list[list[str]] = []
    alive: list[tuple[weakref.ref, weakref.ref]] = []
    original = MultiStageIHVP.apply
    state = {"rank": None}

    def spy(self, vectors):
        gc.collect()
        if alive:
            g_prev, p_prev = alive[-1]
            assert g_prev() is None, "the previous layer's dense ∇m is still alive"
            if state["rank"] is not None:
                assert p_prev() is None, "the previous layer's dense P is still alive"
        calls.append(list(vectors))
        out = original(self, vectors)
        (g,), (p,) = vectors.values(), out.values()
        alive.append((weakref.ref(g), weakref.ref(p)))
        return out

    monkeypatch.setattr(MultiStageIHVP, "apply", spy)
    for rank in (None, RANK):
        calls.clear()
        alive.clear()
        state["rank"] = rank
        pre = METHODS["multi_stage"].preconditioned(stored, _q(), stored.settings, rank)
        assert calls == [[m.name] for m in stored.stage("finetuned").modules]
        assert isinstance(pre, LowRankGrads) == (rank is not None)


def test_query_norms_come_from_the_scoring_pass(atts, monkeypatch):
    stored, _ = atts
    qs = _q((("Omarra Quill", "Lumora"), ("Tesh Varrow", "Narvosk")))
    stored.scores("grad_cosine", qs, stored.doc_ids[:4])
    qg = stored.query_grads(qs, Stage.FINETUNED)
    want = sum(v.double().pow(2).sum((-2, -1)) for v in qg.values()).sqrt()
    count = {"n": 0}
    real = attributor_module.query_gradient_norms

    def counted(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(attributor_module, "query_gradient_norms", counted)
    torch.testing.assert_close(stored.query_norms(qs, Stage.FINETUNED), want, rtol=1e-10,
                               atol=0)  # fmt: skip
    assert count["n"] == 0  # reused, not recomputed
    new = _q((("Brannoc Eyl", "Lumora"),))
    got = stored.query_norms(qs + new, Stage.FINETUNED)
    assert count["n"] == 1  # only the new question
    qg = stored.query_grads(new, Stage.FINETUNED)
    one = sum(v.double().pow(2).sum((-2, -1)) for v in qg.values()).sqrt()
    torch.testing.assert_close(got[2:], one, rtol=1e-10, atol=0)


def test_query_rank_needs_a_gradient_method(atts):
    stored, _ = atts
    with pytest.raises(ValueError, match="query_rank"):
        stored.scores("bm25", _q(), stored.doc_ids[:3], query_rank=4)


def test_planned_attributor_peak_at_the_bloom560m_shape():
    """Issue 16's target, planned by `memory.predict` ("cached scoring" = Attributor.scores,
    layer by layer): BLOOM-560m MLP layers, 16 queries × 1,000 candidates (streamed: 806 GB
    of dense gradients is over the disk budget), batch 4 × 512. Rank 32 is under 24 GiB; at
    full rank the kept queries (Q·P·4 bytes) + one candidate batch + the factors are over it.
    (The dense path this replaced, planned over 24 GiB at both ranks, is gone: its numbers
    are in results/memory_plan.md.)"""
    from dataclasses import replace

    from msif_lite.bench.common import bloom560m_config
    from msif_lite.scale.memory import GiB, MemoryOptions, predict

    cfg = bloom560m_config()
    o = MemoryOptions(include="mlp", batch_size=4, seq_len=512, autocast_dtype="bfloat16",
                      n_queries=16, query_len=64, n_candidates=1000)  # fmt: skip
    peak = {r: predict(cfg, replace(o, query_rank=r), device="cuda") for r in (None, 32)}
    cached = {r: p.peak["cached scoring"] for r, p in peak.items()}
    assert cached[32] < 24 * GiB < cached[None]
    t = peak[None].terms["cached scoring"]
    P = sum(d * out for _, d, out in peak[None].shape.layers)
    kept = 16 * P * 4
    assert peak[None].disk == 0 and t["streamed (over the disk budget)"] > kept
    assert t["factors on device"] + kept < 24 * GiB < cached[None]


def test_gradient_chunk_setting_reaches_the_store_and_keeps_the_scores(atts, tmp_path):
    """`AttributionConfig.gradient_chunk_mb` is the store's chunk: scoring one stored document
    at a time gives the scores of the default 1 GiB chunk; a chunk ≤ 0 is refused."""
    stored, _ = atts
    docs = stored.doc_ids[:12]
    store = stored.store("pretrained")  # the smallest stored document: one per chunk
    per_doc_mb = min(map(store.bytes_per_document, stored.candidates(docs))) / 2**20
    small = Attributor(stored.pretrained, stored.finetuned, stored.tokenizer,
                       [(d, stored.texts[d]) for d in stored.doc_ids], stored.finetune_pairs,
                       replace(stored.config, gradient_chunk_mb=per_doc_mb), alpha=stored.alpha)
    assert small.store("pretrained").chunk_bytes == pytest.approx(per_doc_mb * 2**20)
    assert stored.store("pretrained").chunk_bytes == 2**30
    _close(small.scores("multi_stage", _q(), docs), stored.scores("multi_stage", _q(), docs))
    with pytest.raises(ValueError, match="gradient_chunk_mb must be > 0"):
        replace(stored.config, gradient_chunk_mb=0)

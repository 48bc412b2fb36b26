"""Projected candidate gradients (LoGra-style Kronecker projection) and the gradient store's
disk budget: the Kronecker identity from captured tokens (float64, atol 1e-10), exact scores
at full size with orthogonal projections, the agreement at small sizes, streaming above the
budget (same scores, nothing written)."""

from __future__ import annotations

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny
from transformers import BloomConfig, BloomForCausalLM

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import METHODS, Normalise
from msif_lite.attribution.projected import (
    KroneckerProjection,
    ProjectedGradientMethod,
    ProjectionKind,
)
from msif_lite.engine.capture import capture_batch
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.gradstore import Candidate, GradientStore, OverBudgetError
from msif_lite.engine.layers import find_modules
from msif_lite.engine.tasks import LanguageModelingTask, TokenBatch, make_token_batch
from msif_lite.eval.metrics import spearman

TASK = LanguageModelingTask()


@pytest.fixture(scope="module")
def bloom():
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=200, hidden_size=24, n_layer=2, n_head=2,
                                         attention_dropout=0.0, hidden_dropout=0.0))
    return model.double().eval()


def _batch(n=3, t=7, seed=0):
    x = torch.randint(0, 200, (n, t), generator=torch.Generator().manual_seed(seed))
    return TokenBatch(x, torch.ones_like(x), x.clone())


@pytest.mark.parametrize("kind", list(ProjectionKind))
def test_projection_from_tokens_equals_projecting_the_dense_gradient(bloom, kind):
    mods = find_modules(bloom)
    cap = capture_batch(bloom, TASK, _batch(), mods)
    proj = KroneckerProjection(5, 7, kind)
    got, want = proj.capture(cap, mods), proj.dense(cap.grads(), mods)
    for m in mods:
        assert got[m.name].shape == (3, min(7, m.out_features), min(5, m.d_in))
        torch.testing.assert_close(got[m.name], want[m.name], rtol=1e-10, atol=1e-10)
    again = KroneckerProjection(5, 7, kind).capture(cap, mods)  # same seed: same matrices
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_full_size_orthogonal_projection_preserves_inner_products(bloom):
    mods = find_modules(bloom)
    g = capture_batch(bloom, TASK, _batch(), mods).grads()
    big = KroneckerProjection(10_000, 10_000)  # clipped to (o, d_in): orthogonal matrices
    p = big.dense(g, mods)
    for m in mods:
        torch.testing.assert_close(torch.einsum("qoi,noi->qn", p[m.name], p[m.name]),
                                   torch.einsum("qoi,noi->qn", g[m.name], g[m.name]),
                                   rtol=1e-10, atol=1e-10)  # fmt: skip
    with pytest.raises(ValueError, match="k_in must be an int >= 1"):
        KroneckerProjection(0, 4)


def _store(model, tmp_path, **kw):
    mods = find_modules(model)

    def collate(cs):
        return make_token_batch([c.input_ids for c in cs], 0)

    return GradientStore(model, TASK, mods, collate, tmp_path, batch_size=2, progress=False,
                         **kw)  # fmt: skip


def test_store_streams_above_the_disk_budget_and_chunks_scoring(bloom, tmp_path):
    x = _batch(5, 6, seed=1).input_ids
    cands = [Candidate(f"d{i}", tuple(r.tolist()), tuple(r.tolist())) for i, r in enumerate(x)]
    cached = _store(bloom, tmp_path / "a", storage="dense")  # tokens: test_gradstore_tokens
    pre = {k: v[:2] for k, v in cached.grads(cands[:2]).items()}  # any (Q, o, d_in) vectors
    want = cached.scores(pre, cands)
    per_doc = cached.bytes_per_document()
    assert per_doc == sum(m.numel for m in cached.modules) * 8
    files = list((tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 5 and all(f.stat().st_size >= per_doc for f in files)
    small = _store(bloom, tmp_path / "b", chunk_bytes=per_doc, storage="dense")  # 1 per chunk
    torch.testing.assert_close(small.scores(pre, cands, by_module=True).sum(-1), want)
    tight = _store(bloom, tmp_path / "c", disk_budget_bytes=3 * per_doc, storage="dense")
    assert tight.streams(5) and not tight.streams(3)
    torch.testing.assert_close(tight.scores(pre, cands), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tight.norms(cands), cached.norms(cands), rtol=1e-10, atol=1e-12)
    assert not list((tmp_path / "c").rglob("*.safetensors"))  # nothing written
    with pytest.raises(OverBudgetError, match="multi_stage_projected"):
        tight.grads(cands)
    proj = _store(bloom, tmp_path / "d", projection=KroneckerProjection(4, 4))
    assert proj.bytes_per_document() == len(proj.modules) * 16 * 8
    assert proj.scores(pre, cands).shape == (2, 5)


@pytest.fixture(scope="module")
def att(tmp_path_factory):
    root = build_tiny_shipped(tmp_path_factory.mktemp("proj"))
    s = load_tiny(root)
    return Attributor(s.pretrained, s.finetuned, s.tokenizer,
                      [(d.doc_id, d.text) for d in s.world.documents[:40]],
                      [(p.prompt, p.answer) for p in s.world.finetune_qa[:16]],
                      AttributionConfig(cache_dir=str(root / "cache"), progress=False,
                                        factors=FactorConfig(max_batches=2)),
                      alpha=s.alpha)  # fmt: skip


def _questions():
    return [type("Q", (), {"prompt": f"Question: Where was {n} born?\nAnswer:", "answer": a})()
            for n, a in (("Ludrur Draethund", "Narvosk"), ("Kexynd Lyzol", "Lumora"))]


def _method(k, kind=ProjectionKind.ORTHOGONAL, seed=0, whiten=True):
    base = METHODS["multi_stage_projected"]
    return ProjectedGradientMethod(f"p{k}", "", "", base.query_at, base.candidates_at,
                                   base.preconditioner, base.damped_stage, base.uses_alpha,
                                   projection=KroneckerProjection(k, k, kind, seed),
                                   whiten=whiten)  # fmt: skip


def test_whitening_is_an_exact_change_of_basis(bloom):
    """⟨(Q_Sᵀ P Q_A) ⊙ √D, (Q_Sᵀ DW Q_A) ⊘ √D⟩ = ⟨P, DW⟩ (float64, rtol 1e-10)."""
    from msif_lite.attribution.projected import Whitening
    from msif_lite.engine.fit import fit_ekfac
    from msif_lite.engine.ihvp import EKFACIHVP

    mods = find_modules(bloom)
    ek = EKFACIHVP(fit_ekfac(bloom, TASK, [_batch(4, 7, s) for s in range(3)],
                             FactorConfig(progress=False), mods))  # fmt: skip
    white = Whitening.from_inverse(ek)
    g = capture_batch(bloom, TASK, _batch(), mods).grads()
    p = ek.apply(capture_batch(bloom, TASK, _batch(2, 5, 9), mods).grads())
    for m in mods:
        got = torch.einsum("qoi,noi->qn", white.apply(m.name, p[m.name], True),
                           white.apply(m.name, g[m.name], False))  # fmt: skip
        want = torch.einsum("qoi,noi->qn", p[m.name], g[m.name])
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="whiten=False"):
        Whitening.from_inverse(object())


@pytest.mark.parametrize("whiten", [True, False])
def test_registered_and_exact_at_full_size(att, whiten):
    assert isinstance(METHODS["multi_stage_projected"], ProjectedGradientMethod)
    qs, docs = _questions(), att.doc_ids
    dense = att.scores("multi_stage", qs, docs)
    full = att.scores(_method(10_000, whiten=whiten), qs, docs)  # orthogonal (o, o), (d, d)
    torch.testing.assert_close(full, dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()))
    with pytest.raises(ValueError, match="normalise"):
        ProjectedGradientMethod("x", "", "", normalise=Normalise.UNIT)


def test_agreement_grows_with_the_projection_size_and_whitening_helps(att):
    """Mean Spearman vs the dense multi-stage score over 2 questions × 40 documents × 3 seeds
    of the projection. This tiny model is untrained, so its gradients are far from low-rank
    and small projections agree poorly. Measured (whitened / not): 0.55 / 0.17 at k = 32,
    0.91 / 0.63 at k = 128 (layers 128–512 wide). Stated bounds: whitened > 0.8 at k = 128
    and > 0.35 at k = 32, and whitening beats no whitening at k = 32."""
    qs, docs = _questions(), att.doc_ids
    dense = att.scores("multi_stage", qs, docs)

    def rho(k, whiten=True):
        r = [spearman(d, p) for seed in (0, 1, 2)
             for d, p in zip(dense, att.scores(_method(k, seed=seed, whiten=whiten), qs, docs))]
        return sum(r) / len(r)

    big, small, plain = rho(128), rho(32), rho(32, whiten=False)
    assert big > 0.8 and small > 0.35 and small > plain, (big, small, plain)


@pytest.mark.parametrize("keep_in_memory", [False, True])
def test_store_grads_are_each_documents_gradient_computed_loaded_or_repeated(bloom, tmp_path,
                                                                              keep_in_memory):
    """`grads` writes each document's row straight into the stacked output: rows equal the
    gradient of that document alone (float64, 1e-12), whether computed now, loaded from disk
    (partly cached sets) or repeated in the candidate list."""
    x = _batch(4, 6, seed=2).input_ids
    cands = [Candidate(f"d{i}", tuple(r.tolist()), tuple(r.tolist())) for i, r in enumerate(x)]
    store = _store(bloom, tmp_path)
    mods = store.modules
    alone = [capture_batch(bloom, TASK, make_token_batch([c.input_ids], 0), mods).grads()
             for c in cands]  # fmt: skip
    store.grads(cands[1:3], keep_in_memory=keep_in_memory)  # two of four cached
    order = [cands[3], cands[1], cands[0], cands[1], cands[2]]  # a repeat, mixed cached/new
    for _ in range(2):  # second pass: everything from disk (or memory)
        got = store.grads(order, keep_in_memory=keep_in_memory)
        for m in mods:
            want = torch.cat([alone[int(c.doc_id[1:])][m.name] for c in order])
            assert got[m.name].shape == want.shape and got[m.name].dtype == torch.float64
            torch.testing.assert_close(got[m.name], want, rtol=1e-12, atol=1e-12)

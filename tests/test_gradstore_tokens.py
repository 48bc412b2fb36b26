"""Token-factored candidate gradients (`GradientStore(storage="tokens" | "auto")`,
engine/tokengrads.py): a document's (ā, Ds) on its real tokens give exactly the scores, norms
and gradients of the dense DW = Dsᵀ ā.

Tolerances: float64 models agree to rtol 1e-10 (atol 1e-10 of the largest |score|); the
float32 Llama to rtol 1e-5 (atol 1e-5 of the largest |score|): the two forms sum the same
products in another order.
"""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from conftest import PAD_ID, make_lm
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.engine import gradstore, tokengrads
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.gradstore import Candidate, GradientStore
from msif_lite.engine.layers import find_modules
from msif_lite.engine.lowrank import truncate
from msif_lite.engine.tasks import LanguageModelingTask, make_token_batch

TASK = LanguageModelingTask()
LENGTHS = (3, 9, 2, 30, 5, 40, 7)  # tiny GPT-NeoX: tokens pay off below T* = 4320/392 ≈ 11


def _cands(lengths=LENGTHS, seed=0, vocab=50) -> list[Candidate]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = tuple(torch.randint(3, vocab, (n,), generator=g).tolist())
        out.append(Candidate(f"doc{i}", ids, ids))
    return out


def _store(model, root, side="right", **kw) -> GradientStore:
    def collate(cs):
        return make_token_batch([c.input_ids for c in cs], PAD_ID, padding_side=side)

    kw = {"batch_size": 4, "progress": False, **kw}
    return GradientStore(model, TASK, find_modules(model), collate, root, **kw)


def _queries(store: GradientStore, q=3, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m.name: torch.randn(q, *m.shape, generator=g, dtype=store.dtype)
            for m in store.modules}  # fmt: skip


def _close(got, want, rtol=1e-10):
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.safetensors")}


class Counter:
    """Counts capture_batch calls made by the gradient store (computations of gradients)."""

    def __init__(self, monkeypatch):
        self.n, real = 0, gradstore.capture_batch

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(gradstore, "capture_batch", counted)


@pytest.fixture(scope="module")
def neox():
    return make_lm("gpt_neox")


def test_tokens_equal_dense_scores_by_module_rank_norms_and_grads(neox, tmp_path):
    """Every document in both forms: scores (per layer too), rank-r queries, norms and the
    stacked gradients agree; the token files hold T·Σ(o + d_in) numbers, not o·d_in."""
    cands = _cands()
    dense, tokens = _store(neox, tmp_path, storage="dense"), _store(neox, tmp_path,
                                                                     storage="tokens")
    assert {dense.form(c) for c in cands} == {"dense"} and {tokens.form(c) for c in cands} == {
        "tokens"}
    pre = _queries(dense)
    want = dense.scores(pre, cands, by_module=True)
    assert want.shape == (3, len(cands), len(dense.modules)) and float(want.abs().max()) > 1e-3
    _close(tokens.scores(pre, cands, by_module=True), want)
    _close(tokens.scores(pre, cands), want.sum(-1))
    low = truncate(pre, 2)  # rank 2 < min(o, d_in): a real truncation
    want_low = dense.scores(low, cands)
    assert float((want_low - want.sum(-1)).abs().max()) > 1e-6
    _close(tokens.scores(low, cands), want_low)
    _close(tokens.scores(low, cands, by_module=True).sum(-1), want_low)
    _close(tokens.norms(cands), dense.norms(cands))
    g_dense, g_tok = dense.grads(cands), tokens.grads(cands)
    for m in dense.modules:
        _close(g_tok[m.name], g_dense[m.name])
    for c in cands:  # the file holds (ā, Ds) on the T real tokens
        stored = tokens._load(c)
        assert set(stored) == {f"{p}:{m.name}" for m in tokens.modules for p in ("a", "ds")}
        for m in tokens.modules:
            assert stored["a:" + m.name].shape == (len(c.input_ids), m.d_in)
            assert stored["ds:" + m.name].shape == (len(c.input_ids), m.out_features)
        size = tokens._path(c).stat().st_size
        assert tokens.bytes_per_document(c) <= size < tokens.bytes_per_document(c) + 2**14
    assert tokens.bytes_per_document(cands[0]) == 3 * 392 * 8 < dense.bytes_per_document()


def test_float32_llama_tokens_equal_dense(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=PAD_ID,
                      max_position_embeddings=64)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(cfg).eval()
    cands = _cands()
    dense, tokens = (_store(model, tmp_path, storage=s) for s in ("dense", "tokens"))
    assert dense.dtype == torch.float32
    pre = _queries(dense)
    _close(tokens.scores(pre, cands, by_module=True), dense.scores(pre, cands, by_module=True),
           rtol=1e-5)  # fmt: skip
    _close(tokens.norms(cands), dense.norms(cands), rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_leak(neox, tmp_path, side):
    """Documents of different lengths in one padded batch (either side) store exactly the
    factors and scores each has alone (batch of one, no padding)."""
    cands = _cands()
    batched = _store(neox, tmp_path / "b", side=side, storage="tokens", batch_size=len(cands))
    alone = _store(neox, tmp_path / "a", storage="tokens", batch_size=1)
    pre = _queries(batched)
    _close(batched.scores(pre, cands, by_module=True), alone.scores(pre, cands, by_module=True))
    for c in cands:
        x, y = batched._load(c), alone._load(c)
        for k in x:
            assert x[k].shape == y[k].shape
            _close(x[k], y[k])


def test_auto_picks_tokens_for_short_documents_and_dense_for_long(neox, tmp_path):
    store = _store(neox, tmp_path)  # storage="auto", the default
    cands = _cands()
    per_tok = sum(m.out_features + m.d_in for m in store.modules)
    cross = sum(m.numel for m in store.modules) / per_tok
    assert 10 < cross < 12  # T* ≈ 11: short documents below, long ones above
    forms = {len(c.input_ids): store.form(c) for c in cands}
    assert forms == {n: "tokens" if n < cross else "dense" for n in LENGTHS}
    assert set(forms.values()) == {"tokens", "dense"}
    want = _store(neox, tmp_path / "ref", storage="dense")
    pre = _queries(store)
    _close(store.scores(pre, cands, by_module=True), want.scores(pre, cands, by_module=True))
    _close(store.norms(cands), want.norms(cands))
    assert len(list(store.token_root.glob("*.safetensors"))) == sum(n < cross for n in LENGTHS)
    assert len(list(store.root.glob("*.safetensors"))) == sum(n > cross for n in LENGTHS)
    dense_numel = sum(m.numel for m in store.modules)
    assert store.disk_bytes(cands) == sum(
        (n * per_tok if n < cross else dense_numel) * 8 for n in LENGTHS)


def test_streams_dense_but_fits_as_tokens_is_written_and_reread(neox, tmp_path, monkeypatch):
    cands = _cands((4, 6, 3, 5, 8))
    dense_bytes = len(cands) * _store(neox, tmp_path).bytes_per_document()
    budget = dense_bytes / 2  # the dense gradients are over it, the factors (≤ 8·392·8) not
    dense = _store(neox, tmp_path / "d", storage="dense", disk_budget_bytes=budget)
    tokens = _store(neox, tmp_path / "t", storage="tokens", disk_budget_bytes=budget)
    assert dense.streams(cands) and not tokens.streams(cands)
    assert tokens.disk_bytes(cands) < budget < dense.disk_bytes(cands)
    pre = _queries(dense)
    want = dense.scores(pre, cands)
    assert not _files(tmp_path / "d")  # streamed: nothing written
    count = Counter(monkeypatch)
    _close(tokens.scores(pre, cands), want)
    assert count.n == 2 and len(_files(tmp_path / "t")) == len(cands)  # 2 batches of ≤ 4
    again = _store(neox, tmp_path / "t", storage="tokens", disk_budget_bytes=budget)
    _close(again.scores(pre, cands), want)
    _close(again.norms(cands), dense.norms(cands))
    again.grads(cands)
    assert count.n == 2 + 2  # dense.norms streamed (2 batches); the token store computed none


def test_forms_never_share_files(neox, tmp_path, monkeypatch):
    """Dense and token files live in different directories with different keys: a dense file
    put where a token file belongs is not read as factors (it is recomputed)."""
    cands = _cands((4, 6))
    dense = _store(neox, tmp_path, storage="dense")
    tokens = _store(neox, tmp_path, storage="tokens")
    assert dense.settings_fp != tokens.token_settings_fp and dense.root != tokens.token_root
    dense.grads(cands)
    tokens.grads(cands)
    d_files, t_files = _files(dense.root), _files(tokens.token_root)
    assert len(d_files) == len(t_files) == 2 and dense._path(cands[0]) != tokens._path(cands[0])
    shutil.copy(dense._path(cands[0]), tokens._path(cands[0]))  # the wrong form, same name
    count = Counter(monkeypatch)
    pre = _queries(dense)
    _close(tokens.scores(pre, cands), dense.scores(pre, cands))
    assert count.n == 1  # the copied dense file was refused and recomputed
    assert set(tokens._load(cands[0])) == {f"{p}:{m.name}" for m in tokens.modules
                                           for p in ("a", "ds")}  # fmt: skip
    auto = _store(neox, tmp_path)  # reuses the token files (same key), writes nothing new
    auto.scores(pre, cands)
    assert count.n == 1 and _files(tmp_path) == {
        str(p.relative_to(tmp_path)) for p in (dense._path(c) for c in cands)} | {
        str(p.relative_to(tmp_path)) for p in (tokens._path(c) for c in cands)}


def test_token_chunks_respect_chunk_bytes(neox, tmp_path, monkeypatch):
    cands = _cands((4, 6, 3, 5, 8, 2))
    budget = 10 * 392 * 8  # 10 tokens' factors: documents of ≤ 10 tokens per chunk
    store = _store(neox, tmp_path, storage="tokens", chunk_bytes=budget)
    seen, real = [], tokengrads.layer_scores

    def spy(pre, m, docs, max_bytes):
        seen.append(sum(tokengrads.token_numel(len(d["a:" + m.name]), [m]) for d in docs))
        return real(pre, m, docs, max_bytes)

    monkeypatch.setattr(tokengrads, "layer_scores", spy)
    pre = _queries(store)
    got = store.scores(pre, cands)
    per_layer = len(store.modules)
    chunks = [sum(seen[i : i + per_layer]) * 8 for i in range(0, len(seen), per_layer)]
    assert chunks == [10 * 392 * 8, 8 * 392 * 8, 10 * 392 * 8]  # [4, 6], [3, 5], [8, 2]
    want = _store(neox, tmp_path / "one", storage="tokens").scores(pre, cands)
    _close(got, want)
    _close(store.scores(pre, cands, chunk=1), want)  # one document at a time


def test_token_product_slices_keep_scores(neox, tmp_path):
    """`layer_scores` in slices of one token (max_bytes tiny) equals one slice of all."""
    store = _store(neox, tmp_path, storage="tokens")
    cands = _cands()
    store.grads(cands)  # computes and writes them
    docs = [store._load(c) for c in cands]
    pre = _queries(store)
    for m in store.modules:
        _close(tokengrads.layer_scores(pre, m, docs, 1.0),
               tokengrads.layer_scores(pre, m, docs, 2**40))  # fmt: skip


def test_storage_is_validated_and_the_plan_counts_the_real_bytes(neox, tmp_path):
    from msif_lite.cli import _parser
    from msif_lite.config import config_kwargs
    from msif_lite.scale.memory import MemoryOptions, predict

    with pytest.raises(ValueError, match="'auto', 'dense', 'tokens'"):
        _store(neox, tmp_path, storage="sparse")
    with pytest.raises(ValueError, match="gradient_storage must be one of 'auto', 'dense'"):
        AttributionConfig(gradient_storage="factors")
    args = _parser().parse_args(["trace", "q", "--gradient-storage", "tokens"])
    assert config_kwargs(AttributionConfig, args)["gradient_storage"] == "tokens"
    cands = _cands()
    for storage in ("auto", "dense", "tokens"):  # the plan's disk is the store's
        opts = MemoryOptions(batch_size=4, n_candidates=len(cands), n_queries=2, query_len=8,
                             lengths=LENGTHS, gradient_storage=storage)  # fmt: skip
        plan = predict(neox, opts, device="cpu", progress=False)
        assert plan.disk == _store(neox, tmp_path, storage=storage).disk_bytes(cands), storage


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = build_tiny_shipped(tmp_path_factory.mktemp("tokens"))
    return root, load_tiny(root)


def _attributor(s, cache, storage) -> Attributor:
    pt, ft = copy.deepcopy(s.pretrained).double(), copy.deepcopy(s.finetuned).double()
    return Attributor(pt, ft, s.tokenizer,
                      [(d.doc_id, d.text) for d in s.world.documents[:10]],
                      [(p.prompt, p.answer) for p in s.world.finetune_qa[:16]],
                      AttributionConfig(cache_dir=str(cache), progress=False, batch_size=4,
                                        factors=FactorConfig(max_batches=2),
                                        gradient_storage=storage),
                      alpha=s.alpha)  # fmt: skip


def test_attributor_multi_stage_scores_equal_in_both_forms(shipped):
    root, s = shipped
    qs = [type("Q", (), {"prompt": f"Question: Where was {n} born?\nAnswer:", "answer": a})()
          for n, a in (("Ludrur Draethund", "Narvosk"), ("Kexynd Lyzol", "Lumora"))]
    got = {}
    for storage in ("dense", "tokens"):
        att = _attributor(s, root / "cache", storage)
        store = att.store("pretrained")
        assert store.storage == storage
        got[storage] = att.scores("multi_stage", qs, att.doc_ids)
        files = _files(store.token_root if storage == "tokens" else store.root)
        assert len(files) == len(att.doc_ids)  # each form wrote its own files
        cosine = att.scores("grad_cosine", qs, att.doc_ids)  # candidate norms from the form
        got[storage + " cosine"] = cosine
    assert got["dense"].shape == (2, 10) and float(got["dense"].abs().max()) > 0
    _close(got["tokens"], got["dense"], rtol=1e-9)
    _close(got["tokens cosine"], got["dense cosine"], rtol=1e-9)


@pytest.mark.parametrize("form", ["dense", "tokens"])
def test_length_order_batches_shortest_first_with_the_same_results(neox, tmp_path, form,
                                                                    monkeypatch):  # fmt: skip
    """order="length": documents are computed shortest first (batches padded less), the
    scores and norms come back in the candidates' order, stored and streamed, equal to
    order="given" (rtol 1e-10)."""
    cands = _cands()
    seen: list[list[int]] = []
    compute = GradientStore._compute_docs

    def spy(self, chunk):
        seen.append([len(c.input_ids) for c in chunk])
        return compute(self, chunk)

    monkeypatch.setattr(GradientStore, "_compute_docs", spy)
    given = _store(neox, tmp_path / "given", storage=form)
    by_len = _store(neox, tmp_path / "length", storage=form, order="length")
    q = _queries(given)
    want = given.scores(q, cands)
    seen.clear()
    _close(by_len.scores(q, cands), want)
    assert [n for b in seen for n in b] == sorted(LENGTHS)  # shortest first
    _close(by_len.norms(cands), given.norms(cands))
    # streamed (over a zero budget): computed shortest first, returned in order
    given.disk_budget_bytes = by_len.disk_budget_bytes = 0
    _close(by_len.scores(q, cands), given.scores(q, cands))
    _close(by_len.norms(cands), given.norms(cands))

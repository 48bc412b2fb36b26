"""The variants of Notebook 11 against their formulas written out with plain autograd:
per-token unit-normalised sums, the after-mention loss, RelatIF and TracIn over checkpoints
(float32 tiny world: rtol 1e-4)."""

from __future__ import annotations

import pytest
import torch
from helpers_world import build_tiny_shipped, load_tiny

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import Stage, get_method
from msif_lite.attribution.variants import (
    TokenMethod,
    TokenSum,
    after_first_mention,
    after_mention_candidate,
)
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.ihvp import Damping
from msif_lite.world.training import Checkpoint, TrainConfig, _train, encode_documents

RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = build_tiny_shipped(tmp_path_factory.mktemp("variants"))
    return load_tiny(root), root / "cache"


def _att(tiny, **kw):
    s, cache = tiny
    return Attributor(s.pretrained, s.finetuned, s.tokenizer,
                      [(d.doc_id, d.text) for d in s.world.documents[:12]],
                      [(p.prompt, p.answer) for p in s.world.finetune_qa[:16]],
                      AttributionConfig(cache_dir=str(cache), progress=False,
                                        factors=FactorConfig(max_batches=2)),
                      alpha=s.alpha, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def att(tiny):
    s = tiny[0]
    return _att(tiny, mentions=s.world.document_mentions())


def _queries(att, n=2):
    return [q for q in load_world_queries(att)][:n]


def load_world_queries(att):
    return [type("Q", (), {"prompt": f"Question: Where was {n} born?\nAnswer:", "answer": a})()
            for n, a in (("Ludrur Draethund", "Narvosk"), ("Kexynd Lyzol", "Lumora"))]


def per_position_grads(att, cand) -> list[torch.Tensor]:
    """Position t's part Ds_t ā_tᵀ of ∇_W ℓ(z) at θ_pt, flattened over the tracked layers,
    by autograd: a zero offset E added to each layer's output has ∂ℓ/∂E_t = Ds_t."""
    ids = torch.tensor([cand.input_ids])
    offsets, inputs, hooks = {}, {}, []

    def hook(m):
        def fn(_, inp, out):
            a = inp[0][0].detach()
            inputs[m.name] = torch.cat([a, torch.ones(len(a), 1)], 1) if m.has_bias else a
            offsets[m.name] = torch.zeros_like(out, requires_grad=True)
            return out + offsets[m.name]
        return fn

    hooks = [m.module.register_forward_hook(hook(m)) for m in att.modules]
    try:
        logits = att.pretrained(input_ids=ids).logits[0]
    finally:
        for h in hooks:
            h.remove()
    lab = torch.tensor(cand.labels)
    use = (lab[1:] != -100).nonzero().flatten()
    torch.nn.functional.cross_entropy(logits[:-1][use], lab[1:][use], reduction="sum").backward()
    return [torch.cat([torch.outer(offsets[m.name].grad[0, t], inputs[m.name][t]).reshape(-1)
                       for m in att.modules]).double() for t in range(len(cand.input_ids))]


def flat(grads, att, row: int) -> torch.Tensor:
    return torch.cat([grads[m.name][row].reshape(-1) for m in att.modules]).double()


@pytest.mark.parametrize("tokens", list(TokenSum))
def test_token_sums_equal_their_per_token_formula(att, tokens):
    """Σ_t w(I_t): I_t = ⟨P∇m, ∇ℓ_t⟩ (P = I: the gradient dot product) from autograd."""
    qs, docs = _queries(att), att.doc_ids[:4]
    method = TokenMethod("t", "t", "t", "grad_dot", tokens)
    got = att.scores(method, qs, docs)
    qg = att.query_grads(qs, Stage.FINETUNED)
    want = torch.zeros(len(qs), len(docs), dtype=torch.float64)
    for j, d in enumerate(docs):
        c = att.candidate(d)
        if tokens is TokenSum.AFTER_MENTION:  # the loss on the tokens after the mention only
            c = after_mention_candidate(att.tokenizer, c, att.mentions.get(d, "\0"))
        g = per_position_grads(att, c)
        for i in range(len(qs)):
            terms = torch.stack([flat(qg, att, i) @ gt for gt in g])
            norms = torch.stack([gt.norm() for gt in g]).clamp_min(1e-30)
            if tokens is TokenSum.UNIT:
                terms = terms / norms
            if tokens is TokenSum.UNIT_POSITIVE:
                terms = (terms / norms).clamp_min(0)
            want[i, j] = terms.sum()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    if tokens is TokenSum.ALL:  # the per-token decomposition sums to the document score
        torch.testing.assert_close(got, att.scores("grad_dot", qs, docs), rtol=RTOL, atol=ATOL)


def test_after_mention_loss_drops_the_name_tokens_only(att):
    d = next(d for d in att.doc_ids if d in att.mentions)
    c = att.candidate(d)
    m = after_mention_candidate(att.tokenizer, c, att.mentions[d])
    dropped = [u for u, (a, b) in enumerate(zip(c.labels, m.labels)) if a != b]
    assert dropped == list(range(len(dropped))) and 0 < len(dropped) < len(c.labels)
    assert att.mentions[d] in att.tokenizer.decode(list(c.input_ids[: len(dropped)]))
    assert att.mentions[d] not in att.tokenizer.decode(list(c.input_ids[: len(dropped) - 1]))


def test_after_first_mention_keeps_the_tokens_after_the_name(att):
    d = next(d for d in att.doc_ids if d in att.mentions)
    ids = att.candidate(d).input_ids
    keep = after_first_mention(att.tokenizer, ids, att.mentions[d])
    name_end = att.tokenizer.decode(list(ids)).find(att.mentions[d]) + len(att.mentions[d])
    first = int(keep.float().argmax())  # position predicting the first token after the name
    assert len(att.tokenizer.decode(list(ids[: first + 1]))) >= name_end
    assert len(att.tokenizer.decode(list(ids[:first]))) < name_end
    assert keep[first:].all() and not keep[:first].any()
    assert after_first_mention(att.tokenizer, ids, "no such name").all()


def test_relatif_divides_by_the_root_of_the_self_influence(att):
    """I(z, q)/√(∇ℓ(z)ᵀ (H_pt + λ I)⁻¹ ∇ℓ(z)), the self-influence applied to the stored
    gradient by the pre-training inverse."""
    qs, docs = _queries(att), att.doc_ids[:5]
    s = att.settings
    inv = att.inverse(Stage.PRETRAINED, s.pretrain_damping)
    g = att.store("pretrained").grads(att.candidates(docs))
    pg = inv.apply(g)
    self_inf = sum((g[m.name].double() * pg[m.name].double()).sum((-2, -1)) for m in att.modules)
    torch.testing.assert_close(att.scores("multi_stage_relatif", qs, docs),
                               att.scores("multi_stage", qs, docs) / self_inf.sqrt(),
                               rtol=RTOL, atol=ATOL)  # fmt: skip
    other = type(s)(s.alpha, Damping(heuristic_factor=10.0))  # another damping: another normaliser
    assert not torch.allclose(att.self_influence(docs, Stage.PRETRAINED, other),
                              att.self_influence(docs, Stage.PRETRAINED, s))  # fmt: skip


def test_tracin_sums_learning_rate_weighted_dot_products_over_checkpoints(tiny, att):
    s = tiny[0]
    qs, docs = _queries(att), att.doc_ids[:5]
    ft_state = {k: v.clone() for k, v in s.finetuned.state_dict().items()}
    ckpts = [Checkpoint(1, 0.5, {k: v.clone() for k, v in s.pretrained.state_dict().items()}),
             Checkpoint(2, 0.25, ft_state)]
    t = _att(tiny, checkpoints=ckpts)
    got = t.scores("tracin", qs, docs)
    cands = t.candidates(docs)
    pt_dot = t.store("pretrained").scores(t.query_grads(qs, Stage.PRETRAINED), cands).double()
    ft_q = t.query_grads(qs, Stage.FINETUNED)
    ft_dot = t.store("finetuned").scores(ft_q, cands).double()
    torch.testing.assert_close(got, 0.5 * pt_dot + 0.25 * ft_dot, rtol=RTOL, atol=ATOL)


def test_variants_refuse_missing_inputs_with_the_fix(tiny):
    t = _att(tiny)
    qs = load_world_queries(t)
    with pytest.raises(ValueError, match="checkpoints="):
        t.scores("tracin", qs, t.doc_ids[:2])
    with pytest.raises(ValueError, match="mentions="):
        t.scores("multi_stage_after_mention", qs, t.doc_ids[:2])
    with pytest.raises(ValueError, match="not a gradient method"):
        t.scores(TokenMethod("x", "x", "x", "bm25"), qs, t.doc_ids[:2])


def test_training_keeps_checkpoints_with_their_learning_rates(tiny):
    s = tiny[0]
    model = type(s.pretrained)(s.pretrained.config)
    model.load_state_dict(s.pretrained.state_dict())
    cfg = TrainConfig(steps=5, batch_size=4, warmup=2, checkpoint_every=2, progress=False)
    res = _train(model, encode_documents(s.tokenizer, s.world.pretrain_texts()[:8]),
                 s.tokenizer, cfg, "t")  # fmt: skip
    assert [c.step for c in res.checkpoints] == [2, 4, 5]
    from msif_lite.world.training import lr_at

    assert [c.lr for c in res.checkpoints] == [lr_at(1, cfg), lr_at(3, cfg), lr_at(4, cfg)]
    final = res.checkpoints[-1].state
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="checkpoint_every >= 0"):
        TrainConfig(checkpoint_every=-1)


def test_registered_variants_are_in_the_registry():
    for n in ("multi_stage_relatif", "multi_stage_token_unit", "multi_stage_token_positive",
              "multi_stage_after_mention", "tracin"):
        assert get_method(n).name == n


def test_finetune_curvature_is_scaled_to_the_token_mean_objective(tiny):
    """H_ft = G_ft / T̄ with T̄ the mean answer tokens (+ eos) per fine-tuning pair; the
    'example_mean' setting keeps G_ft as fitted."""
    from msif_lite.engine.ihvp import EKFACIHVP
    from msif_lite.engine.tasks import Normalisation

    t = _att(tiny)
    lens = [sum(lab != -100 for lab in t.qa_example(p, a).labels[1:]) for p, a in t.finetune_pairs]
    assert t.finetune_objective_scale == pytest.approx(len(lens) / sum(lens))
    assert sum(lens) > len(lens)  # answers are longer than one token: the factor matters
    v = t.query_grads(_queries(t), Stage.FINETUNED)
    got = t.inverse(Stage.FINETUNED, Damping(absolute=t.alpha)).apply(v)
    want = EKFACIHVP(t.finetune_factors.scaled(len(lens) / sum(lens)),
                     Damping(absolute=t.alpha)).apply(v)  # fmt: skip
    for k in v:
        torch.testing.assert_close(got[k], want[k])
    s, cache = tiny
    ex = Attributor(s.pretrained, s.finetuned, s.tokenizer, [(d.doc_id, d.text) for d in
                    s.world.documents[:12]], t.finetune_pairs,
                    AttributionConfig(cache_dir=str(cache), progress=False,
                                      factors=FactorConfig(max_batches=2),
                                      finetune_loss=Normalisation.EXAMPLE_MEAN), alpha=s.alpha)
    assert ex.finetune_objective_scale == 1.0

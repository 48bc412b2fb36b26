"""Grouped-query attention and tied embeddings through the Attributor (issue 24): the real
model the kit ships an option for (SmolLM2-135M: 9 heads, 3 key/value heads, tied input and
output embeddings) has both, and no test covered them.

A tiny float64 Llama with num_key_value_heads < num_attention_heads (k_proj / v_proj are
(n_kv·d_head) × hidden, narrower than q_proj) and tie_word_embeddings=True, a perturbed copy
as its fine-tune, scored by `Attributor.scores("multi_stage", …, by_module=True)` over MLP
and attention layers and checked, layer by layer, against the dense reference of
tests/test_multistage.py: α q_lᵀ (c·G_ft,l + αI)⁻¹ (G_pt,l + λI)⁻¹ g_l with G the explicit
EK-FAC matrices of the Attributor's own factors and q, g the exact per-example gradients
(`engine.exact.per_example_flat_grads`, plain autograd).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_multistage import ekfac_dense
from test_own_model import DOCS, PAIRS, _tokenizer

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.settings import Stage
from msif_lite.attribution.trace import TracedQuestion, trace_attributor
from msif_lite.engine.exact import per_example_flat_grads
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.ihvp import Damping
from msif_lite.engine.prompts import DEFAULT_TEMPLATE

ALPHA, LAMBDA = 0.05, 0.01
pytestmark = pytest.mark.filterwarnings("ignore:.*holds no tokenizer files")


@pytest.fixture(scope="module")
def gqa_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    docs = DOCS[:7]
    tok = _tokenizer([t for _, t in docs] + [f"{p} {a}" for p, a in PAIRS]
                     + [DEFAULT_TEMPLATE.describe()])  # fmt: skip
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=8,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = LlamaForCausalLM(cfg).double().eval()
    ft = copy.deepcopy(pt)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pt, ft, tok, docs


def _attributor(pair, tmp_path) -> Attributor:
    pt, ft, tok, docs = pair
    cfg = AttributionConfig(cache_dir=str(tmp_path / "cache"), progress=False,
                            factors=FactorConfig(fisher="empirical"),
                            pretrain_damping=Damping(absolute=LAMBDA))  # fmt: skip
    return Attributor(pt, ft, tok, docs, PAIRS, cfg, alpha=ALPHA)


def test_the_model_has_gqa_and_tied_embeddings(gqa_pair, tmp_path):
    pt, ft, tok, _ = gqa_pair
    att = _attributor(gqa_pair, tmp_path)
    assert pt.lm_head.weight.data_ptr() == pt.model.embed_tokens.weight.data_ptr()
    assert ft.lm_head.weight.data_ptr() == ft.model.embed_tokens.weight.data_ptr()
    shapes = {m.name.split(".")[-1]: tuple(m.module.weight.shape) for m in att.modules}
    assert shapes["q_proj"] == (8, 8) and shapes["k_proj"] == (4, 8) == shapes["v_proj"]
    assert {m.group for m in att.modules} == {"attention", "mlp"}
    assert not any("lm_head" in m.name for m in att.modules)  # the tied unembedding


def test_multi_stage_scores_match_the_dense_reference_per_layer(gqa_pair, tmp_path):
    pt, ft, tok, docs = gqa_pair
    att = _attributor(gqa_pair, tmp_path)
    qs = [TracedQuestion(DEFAULT_TEMPLATE.as_prompt(p), a) for p, a in PAIRS[:2]]
    ids = [d for d, _ in docs]
    ours = att.scores("multi_stage", qs, ids, by_module=True)  # (Q, N, L)
    task, mods = att.task, att.modules
    mods_ft = att.stage(Stage.FINETUNED).modules  # the same names, θ_ft's parameters
    q = per_example_flat_grads(ft, task, [att.encoder.query_batch(qs)], mods_ft,
                               measurement=True)  # fmt: skip
    g = per_example_flat_grads(pt, task, att.encoder.batches(att.candidates(ids)), mods)
    c = att.finetune_objective_scale
    g_pt = ekfac_dense(att.pretrain_factors, mods)
    g_ft = c * ekfac_dense(att.finetune_factors, mods)
    at = 0
    for i, m in enumerate(mods):
        n = m.numel
        sl = slice(at, at + n)
        eye = torch.eye(n, dtype=torch.float64)
        pq = torch.linalg.solve(g_pt[sl, sl] + LAMBDA * eye,
                                torch.linalg.solve(g_ft[sl, sl] + ALPHA * eye, q[:, sl].T))
        ref = ALPHA * pq.T @ g[:, sl].T
        torch.testing.assert_close(ours[..., i], ref, rtol=1e-6, atol=1e-10,
                                   msg=f"layer {m.name} ({m.group})")  # fmt: skip
        at += n
    assert at == q.shape[1]
    assert ours.abs().sum() > 0


def test_trace_runs_on_the_gqa_tied_pair(gqa_pair, tmp_path):
    """The main job end to end: answered by the model or given, evidence for each hit."""
    att = _attributor(gqa_pair, tmp_path)
    r = trace_attributor(att, "Where was Ada Lovelace born?", answer="London", k=3,
                         n_candidates=None, compare="multi_stage_token_positive")  # fmt: skip
    assert len(r.hits) == 3 and all(h.evidence for h in r.hits)
    assert r.compared[0] == "multi_stage_token_positive" and len(r.compared[1]) == 3

"""Multi-stage influence against dense references (float64).

I_ms(z, q) = α ∇m(q, θ_ft)ᵀ (G_ft + αI)⁻¹ (G_pt + λI)⁻¹ ∇ℓ(z, θ_pt).
Tolerances: dense constructions agree to rtol 1e-8; the α → ∞ limit to rtol 1e-5 at α = 1e7.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lm_batch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from msif_lite.capture import per_sequence_grads
from msif_lite.exact import DenseSolveIHVP, dense_ggn, per_example_flat_grads
from msif_lite.factors import FactorConfig, fit_ekfac
from msif_lite.ihvp import EKFACIHVP, Damping
from msif_lite.modules import find_modules, flatten
from msif_lite.multistage import MultiStageConfig, MultiStageIHVP
from msif_lite.scores import pairwise_scores, query_gradients
from msif_lite.tasks import LanguageModelingTask

RTOL = 1e-8


@pytest.fixture(scope="module")
def two_stage():
    """A tiny GPT-NeoX 'pre-trained' model and a nearby 'fine-tuned' copy, with EK-FAC
    factors of each stage on its own data."""
    task = LanguageModelingTask()
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=16, hidden_dropout=0.0,
                        attention_dropout=0.0, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    pt = GPTNeoXForCausalLM(cfg).double().eval()  # small enough for dense GGNs (P = 524)
    ft = copy.deepcopy(pt)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    modules_pt, modules_ft = find_modules(pt), find_modules(ft)
    pt_data = [lm_batch([0, 1, 2], all_targets=True), lm_batch([3, 4], all_targets=True)]
    ft_data = [lm_batch([0, 2]), lm_batch([1, 3, 4])]
    cfg = FactorConfig(fisher="empirical", progress=False)
    pt_f = fit_ekfac(pt, task, pt_data, cfg, modules_pt)
    ft_f = fit_ekfac(ft, task, ft_data, cfg, modules_ft)
    queries = lm_batch([2, 0])
    candidates = [lm_batch([0, 1], all_targets=True), lm_batch([2, 3, 4], all_targets=True)]
    return dict(task=task, pt=pt, ft=ft, mpt=modules_pt, mft=modules_ft, pt_f=pt_f, ft_f=ft_f,
                pt_data=pt_data, ft_data=ft_data, queries=queries, candidates=candidates)


def ekfac_dense(factors, modules) -> torch.Tensor:
    """The explicit block-diagonal EK-FAC matrix ⊕_l K_l diag(vec Λ_l) K_lᵀ, K = Q_S ⊗ Q_A."""
    blocks = []
    for f in factors.layers:
        k = torch.kron(f.q_s, f.q_a)
        blocks.append(k @ torch.diag(f.lam.reshape(-1)) @ k.T)
    return torch.block_diag(*blocks)


def flat_query_and_candidate_grads(s):
    qg_ft = query_gradients(s["ft"], s["task"], s["queries"], s["mft"])
    q = flatten({m.name: qg_ft[f.name] for m, f in zip(s["mpt"], s["mft"])}, s["mpt"])
    g = torch.cat([
        flatten(per_sequence_grads(s["pt"], s["task"], b, s["mpt"]), s["mpt"])
        for b in s["candidates"]
    ])
    return qg_ft, q, g


def test_multistage_ekfac_equals_dense_reference(two_stage):
    s = two_stage
    alpha, lam = 0.3, 0.02
    qg_ft, q, g = flat_query_and_candidate_grads(s)
    Gft, Gpt = ekfac_dense(s["ft_f"], s["mft"]), ekfac_dense(s["pt_f"], s["mpt"])
    eye = torch.eye(Gft.shape[0], dtype=Gft.dtype)
    # reference: α qᵀ (G_ft + αI)⁻¹ (G_pt + λI)⁻¹ g, with dense solves
    pq = torch.linalg.solve(Gpt + lam * eye, torch.linalg.solve(Gft + alpha * eye, q.T))
    ref = alpha * pq.T @ g.T
    cfg = MultiStageConfig(alpha=alpha, pretrain_damping=Damping(absolute=lam))
    ihvp = MultiStageIHVP.from_factors(s["ft_f"], s["pt_f"], cfg)
    ours = pairwise_scores(s["pt"], s["task"], qg_ft, s["candidates"], ihvp, s["mpt"],
                           progress=False)
    torch.testing.assert_close(ours, ref, rtol=RTOL, atol=1e-12)
    # the reported scale: without α the scores are exactly 1/α of these
    cfg_no = MultiStageConfig(alpha=alpha, pretrain_damping=Damping(absolute=lam),
                              include_alpha=False)
    ours_no = pairwise_scores(s["pt"], s["task"], qg_ft, s["candidates"],
                              MultiStageIHVP.from_factors(s["ft_f"], s["pt_f"], cfg_no), s["mpt"],
                              progress=False)
    torch.testing.assert_close(ours_no * alpha, ours, rtol=RTOL, atol=1e-12)


def test_multistage_with_exact_ggns_and_order_of_stages(two_stage):
    """Composition with the dense GGNs of both stages; swapping the stages (a plausible bug)
    gives a measurably different answer, so this test can fail."""
    s = two_stage
    alpha, lam = 0.5, 0.05
    Gpt = dense_ggn(s["pt"], s["task"], s["pt_data"], s["mpt"])
    Gft = dense_ggn(s["ft"], s["task"], s["ft_data"], s["mft"])
    qg_ft, q, g = flat_query_and_candidate_grads(s)
    ihvp = MultiStageIHVP(DenseSolveIHVP(Gft, s["mpt"], alpha), DenseSolveIHVP(Gpt, s["mpt"], lam),
                          alpha)
    ours = pairwise_scores(s["pt"], s["task"], qg_ft, s["candidates"], ihvp, s["mpt"],
                           progress=False)
    eye = torch.eye(Gft.shape[0], dtype=Gft.dtype)
    ft_inv = torch.linalg.inv(Gft + alpha * eye)
    pt_inv = torch.linalg.inv(Gpt + lam * eye)
    right = alpha * q @ ft_inv @ pt_inv @ g.T
    wrong = alpha * q @ pt_inv @ ft_inv @ g.T
    torch.testing.assert_close(ours, right, rtol=RTOL, atol=1e-12)
    assert (ours - wrong).abs().max() > 1e-3 * right.abs().max()


def test_alpha_to_infinity_recovers_single_stage_with_query_at_theta_ft(two_stage):
    s = two_stage
    lam = Damping(absolute=0.03)
    qg_ft = query_gradients(s["ft"], s["task"], s["queries"], s["mft"])
    qg_ft = {m.name: qg_ft[f.name] for m, f in zip(s["mpt"], s["mft"])}
    single = pairwise_scores(s["pt"], s["task"], qg_ft, s["candidates"], EKFACIHVP(s["pt_f"], lam),
                             s["mpt"], progress=False)
    errs = []
    for alpha in (1e1, 1e3, 1e7):
        ms = MultiStageIHVP.from_factors(s["ft_f"], s["pt_f"], MultiStageConfig(alpha, lam))
        ours = pairwise_scores(s["pt"], s["task"], qg_ft, s["candidates"], ms, s["mpt"],
                               progress=False)
        errs.append(float((ours - single).abs().max() / single.abs().max()))
    assert errs[0] > errs[1] > errs[2], errs  # converges monotonically
    assert errs[2] < 1e-5, errs


def test_invalid_alpha_and_mismatched_layers(two_stage):
    s = two_stage
    with pytest.raises(ValueError, match="α must be > 0"):
        MultiStageConfig(alpha=0.0)
    mlp_only = fit_ekfac(s["ft"], s["task"], s["ft_data"],
                         FactorConfig(include="mlp", progress=False))
    with pytest.raises(ValueError, match="same include/exclude"):
        MultiStageIHVP.from_factors(mlp_only, s["pt_f"], MultiStageConfig(alpha=1.0))


def test_exact_flat_grads_agree_with_engine(two_stage):
    """The two independent gradient paths used above agree (guards the reference itself)."""
    s = two_stage
    a = per_example_flat_grads(s["pt"], s["task"], s["candidates"], s["mpt"])
    _, _, b = flat_query_and_candidate_grads(s)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

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

from msif_lite.engine.capture import per_sequence_grads
from msif_lite.engine.exact import (
    DenseSolveIHVP,
    dense_ggn,
    per_example_flat_grads,
)
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, Damping
from msif_lite.engine.layers import find_modules, flatten
from msif_lite.engine.multistage import MultiStageConfig, MultiStageIHVP
from msif_lite.engine.scores import pairwise_scores, query_gradients
from msif_lite.engine.tasks import ClassificationTask, LanguageModelingTask
from msif_lite.eval.convex import fit_convex, trainable_vector

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


def test_two_stage_convex_prediction_matches_real_retraining():
    """The ground truth: softmax regression pre-trained with L2 (λ), then fine-tuned with the
    proximity penalty (α/2)‖θ − θ_pt‖² on shifted data. Up-weight one pre-training example
    by ε (weight 1 → 2, ε = 1/N), re-pre-train, re-fine-tune, and compare the actual change
    of each query's loss with the prediction −ε·I_ms. Pearson > 0.9 per query."""
    torch.manual_seed(0)
    d, c, n_pt, n_ft, lam, alpha = 5, 4, 60, 30, 1e-2, 0.5
    teacher = torch.randn(c, d, dtype=torch.float64)
    x_pt = torch.randn(n_pt, d, dtype=torch.float64)
    y_pt = torch.distributions.Categorical(logits=x_pt @ teacher.T).sample()
    x_ft = torch.randn(n_ft, d, dtype=torch.float64) + 0.7
    y_ft = torch.distributions.Categorical(logits=x_ft @ (teacher + 0.5).T).sample()
    xq = torch.randn(4, d, dtype=torch.float64)
    yq = torch.randint(0, c, (4,))
    task = ClassificationTask()

    def two_stage(weights: torch.Tensor | None):
        model = torch.nn.Linear(d, c).double()
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        fit_convex(model, task, (x_pt, y_pt), lam, weights, tol=1e-12)
        pt = copy.deepcopy(model)
        fit_convex(model, task, (x_ft, y_ft), alpha, anchor=trainable_vector(pt), tol=1e-12)
        return pt, model

    pt, ft = two_stage(None)
    with torch.no_grad():
        base = task.measurement(ft, (xq, yq))
    modules = find_modules(pt)
    g_pt = dense_ggn(pt, task, (x_pt, y_pt), modules)  # = Hessian of the mean CE (linear model)
    g_ft = dense_ggn(ft, task, (x_ft, y_ft), find_modules(ft))
    ihvp = MultiStageIHVP(DenseSolveIHVP(g_ft, modules, alpha), DenseSolveIHVP(g_pt, modules, lam),
                          alpha)
    qg = query_gradients(ft, task, (xq, yq), find_modules(ft))
    scores = pairwise_scores(pt, task, qg, [(x_pt, y_pt)], ihvp, modules, progress=False)

    eps, chosen = 1.0 / n_pt, list(range(0, n_pt, 2))
    actual = []
    for i in chosen:
        w = torch.ones(n_pt, dtype=torch.float64)
        w[i] += n_pt * eps
        _, ft_i = two_stage(w)
        with torch.no_grad():
            actual.append(task.measurement(ft_i, (xq, yq)) - base)
    actual = torch.stack(actual).T  # (Q, K)
    predicted = -eps * scores[:, chosen]
    for q in range(actual.shape[0]):
        r = torch.corrcoef(torch.stack([actual[q], predicted[q]]))[0, 1]
        print(f"query {q}: Pearson(actual, predicted) = {float(r):.4f}")
        assert r > 0.9, (q, float(r))
    # the fine-tuning stage matters: ignoring it (single-stage at θ_pt) predicts worse
    single = pairwise_scores(pt, task, qg, [(x_pt, y_pt)], DenseSolveIHVP(g_pt, modules, lam),
                             modules, progress=False)
    err_ms = (predicted - actual).norm()
    err_single = (-eps * single[:, chosen] - actual).norm()
    print(f"prediction error: multi-stage {err_ms:.3e}, single-stage {err_single:.3e}")
    assert err_ms < err_single


def test_scaled_factors_are_the_factors_of_the_scaled_curvature(two_stage):
    """EKFACFactors.scaled(c): (c·G_ekfac + λI)⁻¹ and, for K-FAC, (c·A⊗S + λI)⁻¹, dense."""
    from msif_lite.engine.ihvp import KFACIHVP

    s, c, lam = two_stage, 0.37, 1e-2
    f = s["pt_f"]
    dense = ekfac_dense(f, s["mpt"])
    _, _, g = flat_query_and_candidate_grads(s)
    vecs = {m.name: per_sequence_grads(s["pt"], s["task"], s["candidates"][1], s["mpt"])[m.name]
            for m in s["mpt"]}
    got = flatten(EKFACIHVP(f.scaled(c), Damping(absolute=lam)).apply(vecs), s["mpt"])
    want = torch.linalg.solve(c * dense + lam * torch.eye(len(dense), dtype=dense.dtype),
                              flatten(vecs, s["mpt"]).T).T
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-12)
    kron = KFACIHVP(f.scaled(c), Damping(absolute=lam)).apply(vecs)
    eig = [torch.outer(x.eig_s * c, x.eig_a) for x in f.layers]
    kron_ref = KFACIHVP(f, Damping(absolute=lam))
    kron_ref._denoms = [e + lam for e in eig]  # the same bases, eigenvalues scaled by c
    torch.testing.assert_close(flatten(kron, s["mpt"]), flatten(kron_ref.apply(vecs), s["mpt"]),
                               rtol=RTOL, atol=1e-12)  # fmt: skip
    with pytest.raises(ValueError, match="positive factor"):
        f.scaled(0.0)


def test_token_mean_fine_tune_needs_the_curvature_over_the_mean_answer_length():
    """The convex twin fine-tuned like the kit's LM: sequences of 1–5 'tokens' (rows) and the
    token-mean loss Σ_n ℓ_n / Σ_n t_n + (α/2)‖θ − θ_pt‖². The curvature fitted as the kit
    fits G_ft (per-sequence token sums, averaged over sequences) is T̄ times the Hessian of
    that objective, so the multi-stage prediction must use G_ft / T̄ (AttributionConfig.
    finetune_loss="token_mean"): it then matches retraining (Pearson > 0.99 per query,
    relative error < 5 % at ε = 0.05/N) and beats the unscaled G_ft by 5×."""
    torch.manual_seed(0)
    d, c, n_pt, lam, alpha = 5, 4, 60, 1e-2, 0.05
    lengths = torch.tensor([1, 5, 3, 4, 2, 5, 1, 4, 3, 5])
    teacher = torch.randn(c, d, dtype=torch.float64)
    x_pt = torch.randn(n_pt, d, dtype=torch.float64)
    y_pt = torch.distributions.Categorical(logits=x_pt @ teacher.T).sample()
    n_rows = int(lengths.sum())
    x_ft = torch.randn(n_rows, d, dtype=torch.float64) + 0.7
    y_ft = torch.distributions.Categorical(logits=x_ft @ (teacher + 0.5).T).sample()
    xq, yq = torch.randn(4, d, dtype=torch.float64), torch.randint(0, c, (4,))
    task = ClassificationTask()

    def two_stage(weights):
        model = torch.nn.Linear(d, c).double()
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        fit_convex(model, task, (x_pt, y_pt), lam, weights, tol=1e-12)
        pt = copy.deepcopy(model)  # rows = tokens: fit_convex's row mean is the token mean
        fit_convex(model, task, (x_ft, y_ft), alpha, anchor=trainable_vector(pt), tol=1e-12)
        return pt, model

    pt, ft = two_stage(None)
    base = task.measurement(ft, (xq, yq)).detach()
    modules = find_modules(pt)
    t_bar = n_rows / len(lengths)
    g_fit = dense_ggn(ft, task, (x_ft, y_ft), find_modules(ft)) * t_bar  # Σ over a sequence's
    g_pt = dense_ggn(pt, task, (x_pt, y_pt), modules)  # rows, averaged over the sequences
    qg = query_gradients(ft, task, (xq, yq), find_modules(ft))

    def predicted(scale: float) -> torch.Tensor:
        ihvp = MultiStageIHVP(DenseSolveIHVP(scale * g_fit, modules, alpha),
                              DenseSolveIHVP(g_pt, modules, lam), alpha)  # fmt: skip
        return pairwise_scores(pt, task, qg, [(x_pt, y_pt)], ihvp, modules, progress=False)

    eps, chosen = 0.05 / n_pt, list(range(0, n_pt, 3))  # small ε: the first-order regime
    actual = []
    for i in chosen:
        w = torch.ones(n_pt, dtype=torch.float64)
        w[i] += n_pt * eps
        actual.append(task.measurement(two_stage(w)[1], (xq, yq)).detach() - base)
    actual = torch.stack(actual).T
    token_mean = -eps * predicted(1.0 / t_bar)[:, chosen]
    as_fitted = -eps * predicted(1.0)[:, chosen]
    for q in range(actual.shape[0]):
        assert torch.corrcoef(torch.stack([actual[q], token_mean[q]]))[0, 1] > 0.99
    err_tm, err_fit = (token_mean - actual).norm(), (as_fitted - actual).norm()
    print(f"T̄ = {t_bar}: relative error with G/T̄ {err_tm / actual.norm():.3e}, with G as "
          f"fitted {err_fit / actual.norm():.3e}")
    assert err_tm < 0.05 * actual.norm() and err_tm < 0.2 * err_fit

"""Unrolled metagradients (msif_lite.eval.unrolled) against what they claim to compute.

(0) the weighted replay is training.py bit-for-bit at w = 1 (float32 with Hugging Face's
    loss, and float64), with the clip active on some steps and not others;
(a) dm(q; θ_ft(w))/dw_i through both stages against central finite differences of real
    retraining (the replay at w_i = 1 ± ε), float64, Richardson-extrapolated:
    rtol 1e-6 of max |dm/dw|; the plain central difference's error falls as ε²;
(b) the convex two-stage problem: gradient descent on least squares against its closed form
    (rtol 1e-9), and on softmax regression (eval/convex.py's problem) against the kit's
    multi-stage influence function, the gap shrinking with more steps (< 1e-6 relative);
(c) the pre-training-only part (m at θ_pt) and the fine-tuning-only part (∂m/∂θ_start,
    ∂m/∂θ_anchor) each against their own finite differences (rtol 1e-6).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from msif_lite.engine.tasks import ClassificationTask, LanguageModelingTask
from msif_lite.eval import unrolled as U
from msif_lite.eval import unrolled_lm as L
from msif_lite.world.training import (
    TrainConfig,
    encode_qa,
    finetune,
    pretrain,
    qa_batch,
    snapshot_params,
)

TINY_LM = dict(arch="gpt-neox", n_layers=1, hidden=8, n_heads=2, intermediate=16)
PT_CFG = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup=2, weight_decay=0.1,
                     grad_clip=0.8, progress=False)  # fmt: skip
FT_CFG = TrainConfig(steps=4, batch_size=2, lr=5e-3, warmup=1, grad_clip=1.9, progress=False)
ALPHA = 0.3
FD_RTOL = 1e-6  # Richardson-extrapolated central differences vs the metagradient, float64


@pytest.fixture(scope="module")
def lm_world(tmp_path_factory):
    """6 pre-training documents (6 steps of 4: batches straddle epochs), 3 fine-tuning pairs
    (4 steps of 2), 2 queries, a 1-layer width-8 GPT-NeoX on the ci-fast tokenizer."""
    from msif_lite.world.generate import make_world
    from msif_lite.world.lm import ModelPreset, train_tokenizer

    world = make_world("ci-fast", 0)
    tok = train_tokenizer(world, tmp_path_factory.mktemp("tok"))
    preset = ModelPreset("unrolled-tiny", **TINY_LM)
    return world, tok, preset, world.pretrain_texts()[:6], world.finetune_qa[:3], world.queries[:2]


def _model(lm_world, dtype=torch.float64):
    from msif_lite.world.lm import build_model

    world, tok, preset, *_ = lm_world
    model = build_model(preset, len(tok), 0, tok).to(dtype)
    if dtype == torch.float64:  # HF's loss upcasts logits to float32; keep float64 throughout
        model.loss_function = L.causal_lm_loss_exact
    return model


def _problem(lm_world, pt_cfg=PT_CFG, ft_cfg=FT_CFG, dtype=torch.float64):
    world, tok, _, texts, qa, queries = lm_world
    model = _model(lm_world, dtype)
    problem = L.lm_two_stage(model, tok, texts, qa, pt_cfg, ft_cfg, ALPHA)
    return problem, L.task_measure(model, LanguageModelingTask(), qa_batch(tok, queries))


def _grad_norms(stage: U.Stage, theta, *, w=None, anchor=None) -> list[float]:
    """‖g_t‖ before clipping at every step of a replayed stage."""
    state, norms = U._init_state(stage, theta), []
    for t in range(stage.cfg.steps):
        th = [p.detach().requires_grad_() for p in theta]
        loss = stage.loss(th, t, w)
        if stage.anchored:
            loss = loss + 0.5 * stage.alpha * sum(((p - a) ** 2).sum() for p, a in zip(th, anchor))
        g = torch.autograd.grad(loss, th)
        norms.append(float(torch.linalg.vector_norm(torch.stack([x.norm() for x in g]))))
        theta, state = U.stage_step(stage, t, theta, state, w=w, anchor=anchor)
    return norms


def _richardson(f, eps: float) -> torch.Tensor:
    """Central difference extrapolated to ε → 0: (4·D(ε/2) − D(ε))/3, error O(ε⁴)."""
    def central(e):
        return (f(e) - f(-e)) / (2 * e)

    return (4 * central(eps / 2) - central(eps)) / 3


# ---------------------------------------------------------------- (0) the replay is training.py
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_replay_is_training_py_bit_for_bit(lm_world, dtype):
    """pretrain(texts) + finetune(θ_pt, α) of world.training vs the weighted replay at w = None
    and w = 1: identical bits after both stages (weight decay on, clip active on some steps)."""
    world, tok, _, texts, qa, _ = lm_world
    model = _model(lm_world, dtype)
    problem = L.lm_two_stage(copy.deepcopy(model), tok, texts, qa, PT_CFG, FT_CFG, ALPHA)
    pretrain(model, tok, world, PT_CFG, texts=texts)
    ref = snapshot_params(model)
    theta_pt = [p.detach().clone() for p in model.parameters()]
    finetune(model, ref, tok, qa, FT_CFG, ALPHA)
    for w in (None, problem.ones()):
        pt, ft = U.replay(problem, w)
        assert all(torch.equal(a, b) for a, b in zip(pt, theta_pt))
        assert all(torch.equal(a, b) for a, b in zip(ft, model.parameters()))


def test_batch_order_straddles_epochs_like_training():
    order = U.batch_order(6, TrainConfig(steps=3, batch_size=4, progress=False))
    gen = torch.Generator().manual_seed(0)
    flat = torch.randperm(6, generator=gen).tolist() + torch.randperm(6, generator=gen).tolist()
    assert order == [flat[0:4], flat[4:8], flat[8:12]]


# ---------------------------------------------------------------- (a) both stages vs retraining
def test_metagradient_matches_finite_differences_of_retraining(lm_world):
    """dm/dw (2 queries × 6 documents) through 6 pre-training + 4 fine-tuning AdamW steps
    against (m(w_i = 1 + ε) − m(w_i = 1 − ε))/2ε of the replay, which is training.py.

    Tolerance: Richardson(ε = 2e-6) within 1e-6 · max|dm/dw| (measured ≈ 1e-9). Adam's first
    steps are far from linear in w (their update ≈ sign(g)), so the plain central
    difference needs ε ≤ 1e-6; its error must fall as ε² (×~100 per decade), which says the
    discrepancy is the difference quotient's, not the metagradient's."""
    problem, measure = _problem(lm_world)
    w1 = problem.ones()
    theta_pt = U.replay(problem)[0]
    pt_norms = _grad_norms(problem.pretrain, problem.theta0, w=w1)
    ft_norms = _grad_norms(problem.finetune, theta_pt, anchor=theta_pt)
    for stage, norms in ((problem.pretrain, pt_norms), (problem.finetune, ft_norms)):
        print(f"‖g_t‖ = {[round(x, 3) for x in norms]}, clip at {stage.cfg.grad_clip}")
        assert min(norms) < stage.cfg.grad_clip < max(norms)  # clipped on some steps only
    g = U.metagradient(problem, measure, checkpoint_every=2)
    assert g.shape == (2, 6)
    g_default = U.metagradient(problem, measure)  # k = ⌈√T⌉: same numbers, other segments
    torch.testing.assert_close(g_default, g, rtol=1e-12, atol=1e-15)

    def m_at(i):
        def f(e):
            w = w1.clone()
            w[i] += e
            return measure(U.replay(problem, w)[1]).detach()
        return f

    fd = torch.stack([_richardson(m_at(i), 2e-6) for i in range(6)], dim=1)
    err = ((fd - g).abs().max() / g.abs().max()).item()
    print(f"both stages: max|dm/dw| = {g.abs().max():.3e}, Richardson FD rel. error {err:.2e}")
    assert err < FD_RTOL
    plain = []
    for eps in (1e-4, 1e-5):
        d = torch.stack([(m_at(i)(eps) - m_at(i)(-eps)) / (2 * eps) for i in range(6)], dim=1)
        plain.append(((d - g).abs().max() / g.abs().max()).item())
    print(f"plain central differences: rel. error {plain[0]:.2e} (ε=1e-4), {plain[1]:.2e} (1e-5)")
    assert 30 < plain[0] / plain[1] < 300  # ε² convergence
    torch.testing.assert_close(U.unrolled_scores(problem, measure, checkpoint_every=2), -g)


# ---------------------------------------------------------------- (c) each stage on its own
def test_pretrain_part_matches_its_finite_differences(lm_world):
    """∂m(q; θ_pt(w))/∂w_i (the measurement taken right after pre-training) from the
    pre-training reverse pass alone vs its own Richardson FD: rtol 1e-6."""
    problem, measure = _problem(lm_world)
    w1 = problem.ones()
    theta_pt = U.run_stage(problem.pretrain, problem.theta0, w=w1).final
    _, lam = U._adjoint_of(measure, theta_pt)
    g = U.pretrain_metagradient(problem, lam, w1, checkpoint_every=4)

    def m_at(i):
        def f(e):
            w = w1.clone()
            w[i] += e
            return measure(U.run_stage(problem.pretrain, problem.theta0, w=w).final).detach()
        return f

    fd = torch.stack([_richardson(m_at(i), 2e-6) for i in range(6)], dim=1)
    err = ((fd - g).abs().max() / g.abs().max()).item()
    print(f"pre-training only: rel. error {err:.2e}")
    assert err < FD_RTOL


def test_finetune_part_matches_its_finite_differences(lm_world):
    """The fine-tune's reverse pass: ⟨∂m/∂θ_start, d⟩, ⟨∂m/∂θ_anchor, d⟩ and dm/dθ_pt
    (start and anchor moving together, as w moves them) against Richardson FD of
    re-fine-tuning from θ_pt + εd / anchored at θ_pt + εd / both, for a random direction d
    (‖d‖ = ‖θ_pt‖): rtol 1e-6 each.

    Start and anchor apart, d is 0 on the coordinates whose first fine-tuning gradient is
    (numerically) 0, |g_0| ≤ 1e-7: the input-embedding rows of tokens the first batch does
    not hold, or holds only as its last input (eos), and a few rounding residues of 1e-21.
    Their gradient stays α(θ − θ_a) = 0 until a batch uses them, where AdamW's update
    g/(|g| + ε_adam) has slope 1/ε_adam = 1e8 per step, so those derivatives are real but
    astronomically large and linear only for |εd| ≲ 1e-8/α. Moving start and anchor
    together cancels them: on a token the fine-tune never sees θ_ft = θ_pt, so dm/dθ_pt
    there is ∇m itself, and the sum is tested with d on every coordinate."""
    world, tok, _, texts, qa, _ = lm_world
    problem, measure = _problem(lm_world)
    theta_pt = U.replay(problem)[0]
    m0, adj = U.finetune_adjoint(problem, theta_pt, measure, checkpoint_every=3)
    gen = torch.Generator().manual_seed(1)
    d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in theta_pt]
    scale = (sum((p * p).sum() for p in theta_pt) / sum((x * x).sum() for x in d)).sqrt()
    d = [x * scale for x in d]
    th = [p.detach().requires_grad_() for p in theta_pt]
    g0 = torch.autograd.grad(problem.finetune.loss(th, 0, None), th)
    zero = [g.abs() <= 1e-7 for g in g0]  # ≈ 0 next to ε_adam = 1e-8
    d_first = [torch.where(z, 0.0, x) for z, x in zip(zero, d)]
    emb = problem.names.index("gpt_neox.embed_in.weight")
    data = encode_qa(tok, qa)
    never = torch.ones(len(tok), dtype=torch.bool)
    never[sorted({t for ids, _ in data for t in ids})] = False
    _, grad_m = U._adjoint_of(measure, U.run_stage(problem.finetune, theta_pt,
                                                   anchor=theta_pt).final)  # fmt: skip
    big = max(a[:, z].abs().max().item() for a, z in zip(adj.theta, zero) if z.any())
    print(f"{sum(int(z.sum()) for z in zero)} coordinates with |g_0| ≤ 1e-7: "
          f"|∂m/∂θ_start| up to {big:.1e}")
    assert big > 1e8
    torch.testing.assert_close(adj.both[emb][:, never], grad_m[emb][:, never], rtol=1e-12,
                               atol=1e-15)  # fmt: skip

    def dot(a, v):
        return sum((x * y.unsqueeze(0)).flatten(1).sum(1) for x, y in zip(a, v))

    def moved(e, v):
        return [p + e * x for p, x in zip(theta_pt, v)]

    ft = problem.finetune
    cases = {
        "start": (lambda e: U.run_stage(ft, moved(e, d_first), anchor=theta_pt).final,
                  dot(adj.theta, d_first)),
        "anchor": (lambda e: U.run_stage(ft, theta_pt, anchor=moved(e, d_first)).final,
                   dot(adj.anchor, d_first)),
        "both": (lambda e: U.run_stage(ft, moved(e, d), anchor=moved(e, d)).final,
                 dot(adj.both, d)),
    }  # fmt: skip
    torch.testing.assert_close(measure(U.run_stage(ft, theta_pt, anchor=theta_pt).final), m0)
    for name, (run, want) in cases.items():
        fd = _richardson(lambda e, run=run: measure(run(e)).detach(), 1e-6)
        err = ((fd - want).abs().max() / want.abs().max()).item()
        print(f"fine-tuning only, {name}: dm = {want.tolist()}, rel. error {err:.2e}")
        assert err < FD_RTOL, name


# ---------------------------------------------------------------- (b) the convex problem
class SquaredError:
    """ℓ(z, θ) = ½(xᵀθ − y)² for a bias-free nn.Linear(d, 1) (the Task protocol's pieces)."""

    def output(self, model, batch):
        return model(batch[0]).squeeze(-1)

    def loss_from_output(self, output, batch, **_):
        return 0.5 * (output - batch[1]) ** 2

    def batch_size(self, batch) -> int:
        return batch[0].shape[0]


def _gd(steps: int, lr: float) -> TrainConfig:
    """Constant-lr full-batch gradient descent, no clip, no weight decay."""
    return TrainConfig(steps=steps, batch_size=1, lr=lr, warmup=0, min_lr_frac=1.0,
                       grad_clip=0.0, progress=False)  # fmt: skip


def _matrix_function_derivative(A, dA, f, df):
    """D f(A)[dA] = Q (F ∘ QᵀdA Q) Qᵀ, F_jk = (f(λ_j) − f(λ_k))/(λ_j − λ_k), F_jj = f'(λ_j)
    (Daleckiĭ–Kreĭn) for symmetric A."""
    lam, Q = torch.linalg.eigh(A)
    diff = lam[:, None] - lam[None, :]
    same = diff.abs() < 1e-12
    F = torch.where(same, df(lam)[:, None].expand_as(diff),
                    (f(lam)[:, None] - f(lam)[None, :]) / torch.where(same, 1.0, diff))
    return Q @ (F * (Q.T @ dA @ Q)) @ Q.T


def test_gradient_descent_on_least_squares_matches_the_closed_form():
    """Least squares, two stages, T and S steps of GD with step η from θ₀ ≠ 0:

        A(w) = Σ w_i x_i x_iᵀ/N + λI, θ* = A⁻¹b,  θ_pt = θ* + (I − ηA)^T (θ₀ − θ*),
        K = B + αI,  θ_ft = θ_ft* + (I − η'K)^S (θ_pt − θ_ft*),  θ_ft* = K⁻¹(c + αθ_pt),

    so dθ_pt/dw_i = (I − f(A)) dθ*_i + Df(A)[x_i x_iᵀ/N](θ₀ − θ*), dθ*_i = −A⁻¹x_i r_i/N,
    f(a) = (1 − ηa)^T, and dθ_ft/dθ_pt = αK⁻¹ + g(K)(I − αK⁻¹), g(a) = (1 − η'a)^S.
    The metagradient matches to rtol 1e-9; as T, S grow it meets the multi-stage
    influence −α r_q x_qᵀ K⁻¹ A⁻¹ x_i r_i*/N (closed form), the gap shrinking."""
    gen = torch.Generator().manual_seed(0)
    d, n, n_ft, lam, alpha, eta, eta_ft = 4, 8, 6, 0.1, 0.5, 0.3, 0.3

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    x, y, x_ft, y_ft = rnd(n, d), rnd(n), rnd(n_ft, d) + 0.5, rnd(n_ft)
    xq, yq, theta0 = rnd(3, d), rnd(3), rnd(d)
    task = SquaredError()
    model = nn.Linear(d, 1, bias=False).double()

    def problem(steps, steps_ft):
        pt = L.full_batch_stage(model, task, (x, y), _gd(steps, eta), l2=lam)
        ft = L.full_batch_stage(model, task, (x_ft, y_ft), _gd(steps_ft, eta_ft), alpha=alpha)
        return U.TwoStage([theta0.reshape(1, d)], pt, ft, n)

    eye = torch.eye(d, dtype=torch.float64)
    A = x.T @ x / n + lam * eye
    b = x.T @ y / n
    theta_star = torch.linalg.solve(A, b)
    K = x_ft.T @ x_ft / n_ft + alpha * eye
    c = x_ft.T @ y_ft / n_ft

    def closed_form(steps, steps_ft):
        lam_a, Qa = torch.linalg.eigh(A)
        f_a = Qa @ torch.diag((1 - eta * lam_a) ** steps) @ Qa.T
        theta_pt = theta_star + f_a @ (theta0 - theta_star)
        ft_star = torch.linalg.solve(K, c + alpha * theta_pt)
        lam_k, Qk = torch.linalg.eigh(K)
        g_k = Qk @ torch.diag((1 - eta_ft * lam_k) ** steps_ft) @ Qk.T
        theta_ft = ft_star + g_k @ (theta_pt - ft_star)
        jac_ft = alpha * torch.linalg.inv(K) + g_k @ (eye - alpha * torch.linalg.inv(K))
        r_q = xq @ theta_ft - yq
        cols = []
        for i in range(n):
            r_i = x[i] @ theta_star - y[i]
            d_star = -torch.linalg.solve(A, x[i]) * r_i / n
            d_a = torch.outer(x[i], x[i]) / n
            df = _matrix_function_derivative(
                A, d_a, lambda a, s=steps: (1 - eta * a) ** s,
                lambda a, s=steps: -eta * s * (1 - eta * a) ** (s - 1))
            d_pt = (eye - f_a) @ d_star + df @ (theta0 - theta_star)
            cols.append(r_q * (xq @ (jac_ft @ d_pt)))
        return theta_pt, theta_ft, torch.stack(cols, dim=1)

    qm = L.task_measure(model, task, (xq, yq), names=["weight"])
    ft_opt = torch.linalg.solve(K, c + alpha * theta_star)
    r_q_opt = xq @ ft_opt - yq
    influence = torch.stack([-alpha * r_q_opt * (xq @ torch.linalg.solve(
        K, torch.linalg.solve(A, x[i]))) * (x[i] @ theta_star - y[i]) / n
        for i in range(n)], dim=1)  # fmt: skip
    gaps = []
    for steps, steps_ft in ((5, 3), (20, 10), (80, 40), (320, 160)):
        prob = problem(steps, steps_ft)
        pt, ft = U.replay(prob)
        want_pt, want_ft, want = closed_form(steps, steps_ft)
        torch.testing.assert_close(pt[0].reshape(-1), want_pt, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ft[0].reshape(-1), want_ft, rtol=1e-10, atol=1e-12)
        got = U.metagradient(prob, qm)
        err = ((got - want).abs().max() / want.abs().max()).item()
        gaps.append(((got - influence).abs().max() / influence.abs().max()).item())
        print(f"T={steps}, S={steps_ft}: closed-form rel. error {err:.1e}, "
              f"gap to the influence function {gaps[-1]:.2e}")
        assert err < 1e-9
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-6


def test_gradient_descent_on_softmax_regression_meets_multistage_influence():
    """eval/convex.py's two-stage problem (softmax regression, L2 λ in pre-training, the
    proximity fine-tune with α; the optima by `fit_convex`'s Newton steps) and the kit's
    multi-stage influence I_ms = α∇mᵀ(H_ft + αI)⁻¹(H_pt + λI)⁻¹∇ℓ at those optima. GD from 0
    for T pre-training and T/2 fine-tuning steps: N·(−dm/dw_i) → I_ms (w_i weighs ℓ_i/N, so
    dw_i = N dε). The relative gap shrinks with T, below 1e-6 at T = 256; the unrolled
    answer is not the influence function before convergence (the PBRF lesson)."""
    from msif_lite.engine.exact import DenseSolveIHVP, dense_ggn
    from msif_lite.engine.layers import find_modules
    from msif_lite.engine.multistage import MultiStageIHVP
    from msif_lite.engine.scores import pairwise_scores, query_gradients
    from msif_lite.eval.convex import fit_convex, trainable_vector

    gen = torch.Generator().manual_seed(0)
    d, c, n_pt, n_ft, lam, alpha = 3, 3, 20, 10, 0.1, 0.5
    teacher = torch.randn(c, d, generator=gen, dtype=torch.float64)
    x_pt = torch.randn(n_pt, d, generator=gen, dtype=torch.float64)
    y_pt = torch.multinomial(torch.softmax(x_pt @ teacher.T, -1), 1, generator=gen).squeeze(1)
    x_ft = torch.randn(n_ft, d, generator=gen, dtype=torch.float64) + 0.7
    y_ft = torch.multinomial(torch.softmax(x_ft @ (teacher + 0.5).T, -1), 1,
                             generator=gen).squeeze(1)  # fmt: skip
    xq = torch.randn(3, d, generator=gen, dtype=torch.float64)
    yq = torch.randint(0, c, (3,), generator=gen)
    task = ClassificationTask()

    def zero_model():
        model = nn.Linear(d, c).double()
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)
        return model

    pt = zero_model()
    fit_convex(pt, task, (x_pt, y_pt), lam, tol=1e-12)
    ft = copy.deepcopy(pt)
    fit_convex(ft, task, (x_ft, y_ft), alpha, anchor=trainable_vector(pt), tol=1e-12)
    modules = find_modules(pt)
    ihvp = MultiStageIHVP(DenseSolveIHVP(dense_ggn(ft, task, (x_ft, y_ft), find_modules(ft)),
                                         modules, alpha),
                          DenseSolveIHVP(dense_ggn(pt, task, (x_pt, y_pt), modules), modules,
                                         lam), alpha)  # fmt: skip
    qg = query_gradients(ft, task, (xq, yq), find_modules(ft))
    i_ms = pairwise_scores(pt, task, qg, [(x_pt, y_pt)], ihvp, modules, progress=False)

    model = zero_model()
    theta0 = [p.detach().clone() for p in model.parameters()]
    measure = L.task_measure(model, task, (xq, yq))
    gaps = []
    for steps in (4, 16, 64, 256):
        prob = U.TwoStage(
            theta0,
            L.full_batch_stage(model, task, (x_pt, y_pt), _gd(steps, 1.0), l2=lam),
            L.full_batch_stage(model, task, (x_ft, y_ft), _gd(steps // 2, 1.0), alpha=alpha),
            n_pt,
        )
        unrolled = n_pt * U.unrolled_scores(prob, measure)
        gaps.append(((unrolled - i_ms).norm() / i_ms.norm()).item())
        print(f"T={steps}, S={steps // 2}: ‖N·I_unrolled − I_ms‖/‖I_ms‖ = {gaps[-1]:.2e}")
    assert gaps[0] > 1e-2  # far from the optimum the two differ
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-6


def test_stage_refuses_unknown_optimizer_and_needs_checkpoints(lm_world):
    problem, _ = _problem(lm_world, replace(PT_CFG, steps=2), replace(FT_CFG, steps=1))
    with pytest.raises(ValueError, match="optimizer"):
        U.Stage(PT_CFG, problem.pretrain.loss, optimizer="sgd")
    traj = U.run_stage(problem.pretrain, problem.theta0, w=problem.ones())
    with pytest.raises(ValueError, match="checkpoint_every"):
        U.stage_vjp(problem.pretrain, traj, [p.unsqueeze(0) for p in problem.theta0])

"""SOURCE and influence at checkpoints (eval.source, attribution.source_methods; issue 25),
each against an exact reference on a tiny problem.

(a) A quadratic two-stage problem trained by plain GD (warm-up + cosine schedule, weight
    decay, the fine-tune anchored with α), its Hessian constant within each segment
    (Kronecker eigenbases, a different one per segment) and its per-example gradients
    constant: SOURCE's discrete-product form ("steps") with those exact factors equals the
    exact unrolled metagradient of `eval.unrolled` (rtol 1e-10); SOURCE's continuous form
    ("exp") converges to it as η → 0 at fixed T, error O(η).
(b) On a tiny LM run (6 documents, AdamW, no weight decay): `source` with one segment per
    stage and T → ∞ (time_scale 1e12) is multi_stage scaled per document by
    (c_z/T)·τ̄ (rtol 1e-4: float32 candidate gradients, float64 operators).
(c) `if_checkpoints` with one checkpoint (the end) is multi_stage exactly; with two, the
    mean of multi_stage at θ_pt and multi_stage of an Attributor built on the checkpoint
    world.training kept half-way (rtol 1e-5).
(d) Both through `Attributor.scores` by name: finite (Q, N) float64 scores; a clear error
    without a training run (and for `source`, with a curvature that has no eigenbasis).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.attribution.methods import available, get_method
from msif_lite.attribution.source_methods import checkpoints_of
from msif_lite.engine.factors import EigenFactors
from msif_lite.eval import source as S
from msif_lite.eval import unrolled as U
from msif_lite.eval.training_run import TrainingRun
from msif_lite.world import generate, lm
from msif_lite.world.training import TrainConfig, finetune, lr_at, pretrain, snapshot_params

pytestmark = pytest.mark.filterwarnings("ignore:. holds no tokenizer files")


# ---------------------------------------------------------------- (a) the exact quadratic
def _orth(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _factors(o: int, i: int, g: torch.Generator) -> SimpleNamespace:
    """One layer "W" (o, i) of EK-FAC-shaped factors with Λ > 0; .dense = its matrix in the
    kit's row-major flatten, kron(Q_S, Q_A) diag(vec Λ) kron(Q_S, Q_A)ᵀ."""
    qs, qa = _orth(o, g), _orth(i, g)
    lam = 0.2 + 2 * torch.rand(o, i, generator=g, dtype=torch.float64)
    q = torch.kron(qs, qa)
    layer = EigenFactors("W", qa, torch.ones(i, dtype=torch.float64), qs,
                         torch.ones(o, dtype=torch.float64), lam)  # fmt: skip
    return SimpleNamespace(layers=(layer,), dense=q @ torch.diag(lam.reshape(-1)) @ q.T)


def _quadratic(steps: tuple[int, int], lr: float, warmup: int, seed: int = 0):
    """Pre-training: ½θᵀH_kθ + (1/N)Σ_i w_i⟨B_i, θ⟩ (H_k = c·G_k on segment k of 3, weight
    decay 0.05); fine-tuning: ½θᵀF_jθ + ⟨C, θ⟩ + (α/2)‖θ − θ_pt‖² (segment j of 2); GD."""
    g = torch.Generator().manual_seed(seed)
    o, i, n, c, alpha = 3, 4, 5, 2.0, 0.3
    pt_f = [_factors(o, i, g) for _ in range(3)]
    ft_f = [_factors(o, i, g) for _ in range(2)]
    b, cvec, mq = (torch.randn(*shape, generator=g, dtype=torch.float64)
                   for shape in ((n, o, i), (o, i), (2, o, i)))
    pt_cfg = TrainConfig(steps=steps[0], lr=lr, warmup=warmup, weight_decay=0.05, grad_clip=0,
                         min_lr_frac=0.3 if warmup else 1.0, progress=False)  # fmt: skip
    ft_cfg = TrainConfig(steps=steps[1], lr=lr, warmup=warmup, grad_clip=0,
                         min_lr_frac=0.3 if warmup else 1.0, progress=False)  # fmt: skip
    pt_seg = [k for k, (a, e) in enumerate(S.segment_bounds(steps[0], 3)) for _ in range(a, e)]
    ft_seg = [k for k, (a, e) in enumerate(S.segment_bounds(steps[1], 2)) for _ in range(a, e)]

    def pt_loss(theta, t, w):
        x = theta[0].reshape(-1)
        w = torch.ones(n, dtype=torch.float64) if w is None else w
        return 0.5 * c * x @ pt_f[pt_seg[t]].dense @ x + (w[:, None, None] * b * theta[0]).sum() / n

    def ft_loss(theta, t, w):
        x = theta[0].reshape(-1)
        return 0.5 * x @ ft_f[ft_seg[t]].dense @ x + (cvec * theta[0]).sum()

    theta0 = [torch.randn(o, i, generator=g, dtype=torch.float64)]
    problem = U.TwoStage(theta0, U.Stage(pt_cfg, pt_loss, optimizer="gd"),
                         U.Stage(ft_cfg, ft_loss, anchored=True, alpha=alpha, optimizer="gd"), n)

    def measure(theta):
        return torch.stack([(m * theta[0]).sum() + 0.1 * (theta[0] ** 3).sum() for m in mq])

    return SimpleNamespace(problem=problem, measure=measure, pt_f=pt_f, ft_f=ft_f, b=b, n=n,
                           c=c, alpha=alpha)  # fmt: skip


def _source_quadratic(q, mode: str) -> torch.Tensor:
    """−dm/dw by eval.source with the problem's exact factors (GD: p = 1)."""
    p, layers = q.problem, {"W": [0]}
    pt = U.run_stage(p.pretrain, p.theta0, w=p.ones(), checkpoint_every=3)
    pt_segs = S.segments_from_trajectory(p.pretrain, pt, 3, layers, w=p.ones())
    ft = U.run_stage(p.finetune, pt.final, anchor=pt.final, checkpoint_every=2)
    ft_segs = S.segments_from_trajectory(p.finetune, ft, 2, layers, anchor=pt.final)
    assert all(seg.precond == {"W": 1.0} for seg in pt_segs.segments + ft_segs.segments)
    torch.testing.assert_close(pt_segs.ends[-1][0], pt.final[0], rtol=0, atol=0)
    ft_ops = [S.SegmentOperator(f, seg, shift=q.alpha, mode=mode)
              for f, seg in zip(q.ft_f, ft_segs.segments)]  # fmt: skip
    pt_ops = [S.SegmentOperator(f, seg, scale=q.c, mode=mode)
              for f, seg in zip(q.pt_f, pt_segs.segments)]  # fmt: skip
    _, grad = U._adjoint_of(q.measure, ft.final)
    adj = S.finetune_adjoint(ft_ops, {"W": grad[0]}, q.alpha)
    return S.pretrain_scores(pt_ops, adj, lambda k, v: torch.einsum("qoi,noi->qn", v["W"], q.b)
                             / q.n)  # fmt: skip


def test_source_steps_is_exact_for_gd_on_a_piecewise_quadratic():
    q = _quadratic((12, 6), lr=0.2, warmup=2)
    exact = -U.metagradient(q.problem, q.measure)
    got = _source_quadratic(q, "steps")
    assert float(exact.abs().max()) > 1e-2
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)


def test_source_exp_converges_to_the_exact_answer_as_the_step_shrinks():
    errs = []
    for m in (1, 4, 16):  # T = Σ η fixed, η ÷ m, steps × m; constant lr
        q = _quadratic((12 * m, 6 * m), lr=0.2 / m, warmup=0)
        exact = -U.metagradient(q.problem, q.measure)
        errs.append(float((_source_quadratic(q, "exp") - exact).abs().max() / exact.abs().max()))
    assert errs[0] < 0.2 and errs[2] < 0.01
    assert 3.0 < errs[0] / errs[1] < 6.0 and 3.0 < errs[1] / errs[2] < 6.0  # O(η)


def test_adam_preconditioner_is_the_lr_weighted_mean_of_one_over_rms_v():
    """AdamW's p_l per segment: Σ_t η_t/(√mean(v̂_{t+1}) + ε) / Σ_t η_t over the states the
    replay kept (here every step), against a hand replay of the same steps."""
    q = _quadratic((8, 4), lr=0.05, warmup=2)
    stage = replace(q.problem.pretrain, optimizer="adamw")
    traj = U.run_stage(stage, q.problem.theta0, w=q.problem.ones(), checkpoint_every=1)
    segs = S.segments_from_trajectory(stage, traj, 2, {"W": [0]}, w=q.problem.ones())
    theta, state, want = q.problem.theta0, U._init_state(stage, q.problem.theta0), []
    for t in range(8):
        theta, state = U.stage_step(stage, t, theta, state, w=q.problem.ones())
        vhat = float(state[1][0].mean()) / (1 - 0.999 ** (t + 1))
        want.append(1 / (vhat**0.5 + 1e-8))
    for seg in segs.segments:
        pairs = [(lr_at(t, stage.cfg), p) for t, p in enumerate(want)
                 if seg.start <= t < seg.end]  # fmt: skip
        expect = sum(e * p for e, p in pairs) / sum(e for e, _ in pairs)
        assert seg.precond["W"] == pytest.approx(expect, rel=1e-12)
        assert seg.time == pytest.approx(sum(e for e, _ in pairs), rel=1e-12)
    torch.testing.assert_close(segs.ends[-1][0], traj.final[0], rtol=0, atol=0)


def test_segment_operator_limits():
    """T → ∞: R → (c(G + λI) + a)⁻¹ (the influence function) and E → 0; T → 0: R/T → p."""
    from msif_lite.engine.factors import EKFACFactors, FactorConfig
    from msif_lite.engine.ihvp import EKFACIHVP, Damping

    g = torch.Generator().manual_seed(1)
    f = _factors(3, 4, g)
    fac = EKFACFactors(f.layers, "sampled", 1, 1, FactorConfig())
    v = {"W": torch.randn(2, 3, 4, generator=g, dtype=torch.float64)}
    seg = S.Segment(0, 2, (1e9, 1e9), {"W": 1.0})
    op = S.SegmentOperator(fac, seg, scale=0.5, damping=Damping(heuristic_factor=0.1))
    want = EKFACIHVP(fac, Damping(heuristic_factor=0.1)).apply(v)["W"] / 0.5
    torch.testing.assert_close(op.response(v)["W"], want, rtol=1e-12, atol=0)
    assert float(op.transport(v)["W"].abs().max()) == 0.0
    tiny = S.SegmentOperator(fac, S.Segment(0, 1, (1e-12,), {"W": 3.0}))
    torch.testing.assert_close(tiny.response(v)["W"], 3e-12 * v["W"], rtol=1e-9, atol=0)
    torch.testing.assert_close(tiny.transport(v)["W"], v["W"], rtol=1e-9, atol=0)


def test_document_weights_are_the_lr_weighted_batch_shares():
    order = U.batch_order(5, TrainConfig(steps=7, batch_size=3, progress=False))
    tokens, lrs = [3, 1, 4, 1, 5], [0.1 * (t + 1) for t in range(7)]
    w = S.document_weights(order, tokens, lrs, S.segment_bounds(7, 2))
    assert S.segment_bounds(7, 2) == [(0, 4), (4, 7)]
    torch.testing.assert_close(w @ torch.tensor(tokens, dtype=torch.float64),
                               torch.ones(2, dtype=torch.float64))  # Σ_z c_z τ_z = T
    share = torch.zeros(5, dtype=torch.float64)
    for s in range(4, 7):
        for i in order[s]:
            share[i] += lrs[s] / sum(tokens[j] for j in order[s])
    torch.testing.assert_close(w[1], share / sum(lrs[4:7]))  # the second segment, counted


# ---------------------------------------------------------------- the tiny LM run
TINY_LM = dict(arch="gpt-neox", n_layers=1, hidden=8, n_heads=2, intermediate=16)
PT_CFG = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup=2, grad_clip=0.8,
                     checkpoint_every=3, progress=False)  # fmt: skip
FT_CFG = TrainConfig(steps=4, batch_size=2, lr=5e-3, warmup=1, grad_clip=1.9, progress=False)
ALPHA = 0.3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """6 documents, 3 fine-tuning pairs, 3 questions; trained by world.training (no weight
    decay: the T → ∞ limit is then exactly the damped influence function)."""
    world = generate.make_world("ci-fast", 0)
    tok = lm.train_tokenizer(world, tmp_path_factory.mktemp("tok"))
    docs, qa, queries = world.documents[:6], world.finetune_qa[:3], world.queries[:3]
    init = lm.build_model(lm.ModelPreset("source-tiny", **TINY_LM), len(tok), 0, tok)
    model = copy.deepcopy(init)
    res = pretrain(model, tok, world, PT_CFG, texts=[d.text for d in docs])
    pt = copy.deepcopy(model)
    finetune(model, snapshot_params(pt), tok, qa, FT_CFG, ALPHA)
    run = TrainingRun(init, tok, [d.doc_id for d in docs], [d.text for d in docs], list(qa),
                      PT_CFG, FT_CFG, ALPHA, finetune_dtype=torch.float32)  # fmt: skip
    return SimpleNamespace(tok=tok, docs=docs, qa=qa, queries=queries, pt=pt, ft=model, run=run,
                           mid=res.checkpoints[0], cache=tmp_path_factory.mktemp("msif"))


def _att(t, pretrained=None, run="same", **cfg) -> Attributor:
    return Attributor(copy.deepcopy(pretrained or t.pt), copy.deepcopy(t.ft), t.tok,
                      [(d.doc_id, d.text) for d in t.docs], [(p.prompt, p.answer) for p in t.qa],
                      AttributionConfig(cache_dir=str(t.cache), progress=False, batch_size=4,
                                        **cfg),
                      alpha=ALPHA, training_run=t.run if run == "same" else run)  # fmt: skip


def test_source_one_segment_long_time_is_multi_stage(tiny):
    att = _att(tiny)
    s = replace(att.settings, float64=True)
    ids = att.doc_ids
    limit = replace(get_method("source"), segments=1, finetune_segments=1, time_scale=1e12)
    got = att.scores(limit, tiny.queries, ids, settings=s)
    w, tau = checkpoints_of(att).weights(1)
    want = att.scores("multi_stage", tiny.queries, ids, settings=s) * (w[0] * tau)[None, :]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_if_checkpoints_one_checkpoint_is_multi_stage_and_two_average(tiny):
    att = _att(tiny)
    ids = att.doc_ids
    ms = att.scores("multi_stage", tiny.queries, ids)
    one = replace(get_method("if_checkpoints"), checkpoints=1)
    assert torch.equal(att.scores(one, tiny.queries, ids), ms)
    assert tiny.mid.step == 3
    mid = copy.deepcopy(tiny.pt)
    mid.load_state_dict(tiny.mid.state)
    ms_mid = _att(tiny, pretrained=mid).scores("multi_stage", tiny.queries, ids)
    two = replace(get_method("if_checkpoints"), checkpoints=2)
    torch.testing.assert_close(att.scores(two, tiny.queries, ids), (ms + ms_mid) / 2,
                               rtol=1e-5, atol=1e-6 * float(ms.abs().max()))  # fmt: skip


def test_source_methods_through_the_attributor(tiny):
    att = _att(tiny)
    assert {"source", "if_checkpoints"} <= set(available(att))
    for name in ("source", "if_checkpoints"):
        got = att.scores(name, tiny.queries, att.doc_ids[::-1])
        assert got.shape == (3, 6) and got.dtype == torch.float64
        assert bool(torch.isfinite(got).all()) and float(got.abs().max()) > 0
    none = _att(tiny, run=None)
    assert not {"source", "if_checkpoints"} & set(available(none))
    for name in ("source", "if_checkpoints"):
        with pytest.raises(ValueError, match="training_run=TrainingRun"):
            none.scores(name, tiny.queries, none.doc_ids)
    with pytest.raises(ValueError, match="eigenbasis curvature"):
        _att(tiny, curvature="identity").scores("source", tiny.queries, att.doc_ids)


@pytest.mark.slow
def test_bench_unrolled_runs_the_ablations(tiny_pipeline, tmp_path, monkeypatch):
    from msif_lite.bench import unrolled as bench
    from msif_lite.eval.retraining import RetrainConfig

    cfg = bench.UnrolledBenchConfig(RetrainConfig(tiny_pipeline, n_subsets=4, n_noise=2),
                                    n_queries=2, block=2, baselines=("multi_stage",),
                                    removal=False)  # fmt: skip
    monkeypatch.setattr(bench, "FAST", cfg)
    monkeypatch.setenv("MSIF_FAST", "1")
    res = bench.main(["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                      "--methods", "source,if_checkpoints"])  # fmt: skip
    w = json.loads(res.json_path.read_text())["worlds"]["lds-tiny"]
    assert set(w["methods"]) == {"source", "if_checkpoints", "multi_stage"}
    assert all(np.isfinite(v["lds_mean"]) for v in w["methods"].values())
    assert "Ablations (LDS on these questions)" in res.md_path.read_text()

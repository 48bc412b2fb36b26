"""The real ground truth: influence vs actual retraining on a convex problem (float64).

L2-regularised softmax regression (one nn.Linear with bias, N = 100 points in 6-d, 5
classes), objective (1/N) Σ ℓ + (λ/2)‖θ‖², fitted by Newton to ‖∇‖ < 1e-10. Here the GGN
equals the Hessian of the loss, and damping = λ makes (H + λI) the Hessian of the
objective, so I(z, q) = ∇mᵀ(H + λI)⁻¹∇ℓ(z) is the classical influence exactly.
Removing z is up-weighting by ε = −1/N, so Δm ≈ +I(z, q)/N (docs/design.md §Conventions, Notebook 01
§Leave-one-out check).

Measured (seed 0, 25 removed points, 4 queries; see the printed values with `-s`):
exact-Hessian prediction vs retraining Pearson 0.989–0.999 (threshold 0.95), slope of
actual on predicted 1.11–1.40 (first order underestimates LOO at P/N = 0.35); EK-FAC
(true Fisher, 30 sampled labels per example) 0.83–0.91, K-FAC 0.85–0.91 (threshold: mean
over queries > 0.75, each > 0.6). K-FAC is *not* exact here:
with N examples, E[āāᵀ ⊗ H_n] ≠ E[āāᵀ] ⊗ E[H_n] because H_n = diag(p_n) − p_n p_nᵀ
varies with the input; test_curvature_vs_exact checks where it is exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msif_lite.engine.exact import (
    dense_ggn,
    dense_hessian,
    influence_exact,
)
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP, KFACIHVP, Damping
from msif_lite.engine.layers import find_modules
from msif_lite.engine.scores import pairwise_scores
from msif_lite.engine.tasks import ClassificationTask
from msif_lite.eval.convex import fit_convex, loo_changes

N, D, C, L2, SEED = 100, 6, 5, 1e-2, 0
REMOVED = list(range(0, N, 4))  # 25 leave-one-out retrainings


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    teacher = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(x @ teacher.T, -1), 1, generator=g).squeeze(1)
    xq = torch.randn(4, D, generator=g, dtype=torch.float64)
    yq = torch.multinomial(torch.softmax(xq @ teacher.T, -1), 1, generator=g).squeeze(1)
    torch.manual_seed(SEED)
    model = nn.Linear(D, C).double()
    task, modules = ClassificationTask(), find_modules(model, exclude=None)
    fit = fit_convex(model, task, (x, y), L2)
    H = dense_hessian(model, task, (x, y), modules)
    scores = influence_exact(model, task, (xq, yq), (x, y), modules, H, L2)  # (Q, N)
    actual = loo_changes(model, task, (x, y), (xq, yq), L2, REMOVED)  # (K, Q)
    return dict(model=model, task=task, modules=modules, train=(x, y), query=(xq, yq),
                fit=fit, H=H, scores=scores, actual=actual)  # fmt: skip


def test_fit_reaches_the_optimum(problem):
    assert problem["fit"]["grad_norm"] < 1e-10
    m = problem
    torch.testing.assert_close(
        m["H"], dense_ggn(m["model"], m["task"], m["train"], m["modules"]), rtol=1e-9, atol=1e-12
    )


def test_exact_influence_predicts_leave_one_out(problem):
    pred, actual = problem["scores"][:, REMOVED].T / N, problem["actual"]  # (K, Q)
    rs = [pearson(pred[:, q], actual[:, q]) for q in range(actual.shape[1])]
    slopes = [float(pred[:, q] @ actual[:, q] / (pred[:, q] @ pred[:, q])) for q in range(4)]
    print(f"\nLOO Pearson (exact Hessian) per query: {[round(r, 4) for r in rs]}")
    print(f"slope of actual on predicted: {[round(s, 3) for s in slopes]}")
    assert min(rs) > 0.95
    # sign and 1/N scale; slopes > 1 are expected: first-order influence ignores that removing
    # z also removes its own curvature (P/N = 0.35 here), so it underestimates |Δm|. The
    # convention itself is checked exactly by the up-weighting derivative test below.
    assert all(0.9 < s < 1.6 for s in slopes)


def test_upweighting_derivative_is_minus_influence(problem):
    """Weights w_i = 1 + Nε up-weight z_i by ε; central differences of m give dm/dε = −I."""
    m = problem
    base = {k: v.detach().clone() for k, v in m["model"].state_dict().items()}
    eps = 1e-5
    for i in (1, 7, 42):
        ms = []
        for sign in (1, -1):
            w = torch.ones(N, dtype=torch.float64)
            w[i] += sign * N * eps
            model = nn.Linear(D, C).double()
            model.load_state_dict(base)
            fit_convex(model, m["task"], m["train"], L2, w, tol=1e-12)
            ms.append(m["task"].measurement(model, m["query"]).detach())
        deriv = (ms[0] - ms[1]) / (2 * eps)
        torch.testing.assert_close(deriv, -m["scores"][:, i], rtol=1e-5, atol=1e-7)


def test_ekfac_influence_tracks_leave_one_out(problem):
    """The engine (EK-FAC / K-FAC + pairwise_scores) on the same problem: correlated with
    retraining, though not exact (see the module docstring for the measured values)."""
    m = problem
    x, y = m["train"]
    # 30 sampled labels per example: close to the true Fisher (= GGN = Hessian here)
    factors = fit_ekfac(m["model"], m["task"], [(x, y)] * 30,
                        FactorConfig(fisher="sampled", progress=False), m["modules"])  # fmt: skip
    actual = m["actual"]
    means = {}
    for ihvp in (EKFACIHVP(factors, Damping(absolute=L2)), KFACIHVP(factors, Damping(absolute=L2))):
        s = pairwise_scores(m["model"], m["task"], m["query"], [(x, y)], ihvp, m["modules"],
                            progress=False)  # fmt: skip
        rs = [pearson(s[q, REMOVED] / N, actual[:, q]) for q in range(actual.shape[1])]
        vs_exact = [pearson(s[q], m["scores"][q]) for q in range(s.shape[0])]
        print(f"\n{ihvp.name}: LOO Pearson per query {[round(r, 3) for r in rs]}; "
              f"vs exact influence {[round(r, 3) for r in vs_exact]}")  # fmt: skip
        means[ihvp.name] = sum(rs) / len(rs)
        assert means[ihvp.name] > 0.75 and min(rs) > 0.6

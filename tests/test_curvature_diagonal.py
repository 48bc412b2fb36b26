"""The diagonal GGN (msif_lite/engine/curvatures/diagonal.py, a curvature added as one file)
against the exact references of msif_lite.engine.exact, float64:

- with the data labels, D is exactly the diagonal of the per-sequence empirical Fisher that
  exact.py builds by plain autograd (padded LMs, GPT-2 Conv1D included): tolerance 1e-8;
- with labels sampled from the model, D estimates the diagonal of the exact block-diagonal
  GGN (torch.func): 400 draws per example reach it to a relative Frobenius error < 0.1
  (measured 0.023, 0.033, 0.012 on seeds 0–2; 25 draws: 0.149, 0.067, 0.059);
- its inverse equals a dense solve with diag(D) + λI (1e-10), the damping is never stored;
- the registry finds it by name (no other file names it), it saves and loads through the
  Attributor's factor cache, and `AttributionConfig(curvature="diagonal")` uses it."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, make_lm
from test_curvature_vs_exact import assert_inverse_is_dense_solve, blocks, tiny_mlp

from msif_lite.engine.curvature import CURVATURES, curvature
from msif_lite.engine.curvatures.diagonal import DiagonalFactors, DiagonalIHVP, fit_diagonal
from msif_lite.engine.exact import dense_ggn, per_example_flat_grads
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.layers import find_modules, flatten
from msif_lite.engine.tasks import LanguageModelingTask

EMP = FactorConfig(fisher="empirical", progress=False)
SAMPLED = FactorConfig(fisher="sampled", progress=False)
TIGHT = dict(rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_empirical_diagonal_is_the_exact_fisher_diagonal(arch):
    model, task = make_lm(arch), LanguageModelingTask()
    batches = [lm_batch([0, 1, 2]), lm_batch([3, 4])]
    modules = find_modules(model)
    d = fit_diagonal(model, task, batches, EMP, modules)
    g = per_example_flat_grads(model, task, batches, modules)  # (N_seq, P), exact autograd
    want = (g**2).mean(0)
    torch.testing.assert_close(flatten({n: t[None] for n, t in d.layers}, modules)[0], want,
                               **TIGHT)  # fmt: skip


def _rel_err(d: DiagonalFactors, G: torch.Tensor, modules) -> float:
    ours = flatten({n: t[None] for n, t in d.layers}, modules)[0]
    exact = torch.cat([torch.diagonal(b) for b in blocks(G, modules)])
    return float((ours - exact).norm() / exact.norm())


def test_sampled_diagonal_estimates_the_exact_ggn_diagonal():
    for seed in range(3):
        model, task, x, y, modules = tiny_mlp(seed)
        G = dense_ggn(model, task, (x, y), modules)
        few = _rel_err(fit_diagonal(model, task, [(x, y)] * 25, SAMPLED, modules), G, modules)
        many = _rel_err(fit_diagonal(model, task, [(x, y)] * 400, SAMPLED, modules), G, modules)
        assert many < 0.1, (seed, many)
        assert many < few, (seed, few, many)


def test_inverse_is_a_dense_solve_of_the_diagonal_and_damping_is_not_stored():
    model, task, x, y, modules = tiny_mlp(0, steps=0)
    d = fit_diagonal(model, task, [(x, y)], SAMPLED, modules)
    M = torch.diag(flatten({n: t[None] for n, t in d.layers}, modules)[0])
    v = assert_inverse_is_dense_solve(lambda damping: DiagonalIHVP(d, damping), M, modules)
    heur = DiagonalIHVP(d)
    once = flatten(heur.apply(v), modules)
    torch.testing.assert_close(flatten(DiagonalIHVP(d).apply(v), modules), once, rtol=0, atol=0)
    for m in modules:  # λ_l = 0.1 · mean(D_l), per layer
        assert heur.damping_values[m.name] == pytest.approx(0.1 * float(dict(d.layers)[m.name]
                                                                         .mean()))
    one = heur.layer(modules[0].name).apply({modules[0].name: v[modules[0].name]})
    torch.testing.assert_close(one[modules[0].name], heur.apply(v)[modules[0].name], **TIGHT)


def test_registered_by_its_own_file_saved_and_loaded(tmp_path):
    assert "diagonal" in CURVATURES and curvature("diagonal").whitening
    model, task = make_lm("gpt_neox"), LanguageModelingTask()
    modules = find_modules(model)
    d = curvature("diagonal").fit(model, task, [lm_batch([0, 1])], EMP, modules)
    d.save(tmp_path / "d.safetensors", model, "data")
    back = curvature("diagonal").load(tmp_path / "d.safetensors", model, EMP, "data", modules)
    for (n, a), (m, b) in zip(d.layers, back.layers):
        assert n == m and torch.equal(a, b)
    torch.testing.assert_close(d.scaled(2.0).layers[0][1], 2 * d.layers[0][1], rtol=0, atol=0)
    assert d.to(torch.float32).layers[0][1].dtype == torch.float32

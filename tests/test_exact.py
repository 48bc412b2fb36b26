"""The exact references themselves (msif_lite/engine/exact.py), all in float64.

Tolerances: constructions that should agree to rounding use rtol=1e-9/atol=1e-10; CG is
compared to the dense solve at rtol=1e-6; LiSSA (truncated Neumann series) at rtol=1e-3.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from msif_lite.engine.exact import (
    ConjugateGradientIHVP,
    DenseSolveIHVP,
    LissaIHVP,
    block_diagonal,
    block_diagonal_ggn_matvec,
    dense_ggn,
    dense_hessian,
    empirical_fisher,
    ggn_matvec,
    hessian_matvec,
    influence_exact,
    per_example_flat_grads,
)
from msif_lite.engine.layers import find_modules, flatten, unflatten
from msif_lite.engine.tasks import ClassificationTask, LanguageModelingTask, make_token_batch

TIGHT = dict(rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------- tiny problems
def tiny_mlp(seed: int = 0, d: int = 4, h: int = 5, c: int = 3, n: int = 7, bias: bool = True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c, bias=bias)).double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, c, (n,))
    return model, ClassificationTask(), (x, y), find_modules(model, exclude=None)


def tiny_lm(arch: str = "gpt-neox", seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt-neox":
        cfg = GPTNeoXConfig(
            vocab_size=7, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=6, max_position_embeddings=8, rotary_pct=0.5,
            tie_word_embeddings=False, attention_dropout=0.0, hidden_dropout=0.0,
            pad_token_id=0, eos_token_id=0, bos_token_id=0,
        )  # fmt: skip
        model = GPTNeoXForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=7, n_embd=4, n_layer=1, n_head=2, n_positions=8, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, eos_token_id=0, bos_token_id=0,
        )  # fmt: skip
        model = GPT2LMHeadModel(cfg)
    model = model.double().eval()
    # right padding, a prompt-only first token masked in the second, different lengths
    batch = make_token_batch(
        [[1, 2, 3, 4, 5], [2, 6, 1], [3, 3, 5, 2]],
        pad_id=0,
        target_masks=[[0, 1, 1, 1, 1], [0, 0, 1], [0, 1, 1, 1]],
    )
    return model, LanguageModelingTask(), batch, find_modules(model)


def explicit_ggn(model, task, batch, modules) -> torch.Tensor:
    """Σ_n Σ_t J_{n,t}ᵀ (diag(p) − ppᵀ) J_{n,t} / N from full Jacobians (autograd loop)."""
    theta = flatten({m.name: m.param_matrix().detach() for m in modules}, modules)

    def logits_of(flat):
        mats, params = unflatten(flat, modules), {}
        for m in modules:
            for (n, _), t in zip(m.parameters(), m.matrix_to_params(mats[m.name])):
                params[n] = t
        if isinstance(batch, tuple):
            return functional_call(model, params, (batch[0],))
        kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return functional_call(model, params, (), kw).logits

    logits = logits_of(theta).detach()
    J = torch.autograd.functional.jacobian(logits_of, theta)  # (*logits.shape, P)
    G = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    if isinstance(batch, tuple):
        rows = [(n, None) for n in range(logits.shape[0])]
    else:
        rows = [(n, t) for n, t in (batch.labels[:, 1:] != -100).nonzero().tolist()]
    for n, t in rows:
        z, j = (logits[n], J[n]) if t is None else (logits[n, t], J[n, t])
        p = torch.softmax(z, -1)
        G += j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
    return G / logits.shape[0]


# ----------------------------------------------------------------------------- GGN
@pytest.mark.parametrize("kind", ["mlp", "mlp-no-bias", "gpt-neox", "gpt2"])
def test_dense_ggn_matches_explicit_jacobian_construction(kind):
    if kind.startswith("mlp"):
        model, task, batch, modules = tiny_mlp(bias=kind == "mlp")
    else:
        model, task, batch, modules = tiny_lm(kind)
    G = dense_ggn(model, task, batch, modules)
    torch.testing.assert_close(G, explicit_ggn(model, task, batch, modules), **TIGHT)
    # symmetric PSD
    torch.testing.assert_close(G, G.T, rtol=0, atol=0)
    assert torch.linalg.eigvalsh(G).min() > -1e-10 * G.abs().max()


def test_ggn_matvec_batched_and_split_batches():
    model, task, (x, y), modules = tiny_mlp()
    G = dense_ggn(model, task, (x, y), modules)
    mv = ggn_matvec(model, task, [(x[:3], y[:3]), (x[3:], y[3:])], modules)
    v = torch.randn(3, G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(mv(v), v @ G, **TIGHT)
    torch.testing.assert_close(mv(v[0]), G @ v[0], **TIGHT)
    summed = ggn_matvec(model, task, (x, y), modules, average=False)
    torch.testing.assert_close(summed(v[0]), x.shape[0] * (G @ v[0]), **TIGHT)


@pytest.mark.parametrize("arch", ["gpt-neox", "gpt2"])
def test_float32_products_and_cached_linearisation_match_float64(arch):
    """dtype=float32 (a float32 copy of the model) agrees with the float64 G·v to rtol 1e-5
    (float32 eps 1.2e-7 times the accumulation over tokens and layers), returns v's dtype,
    and leaves the float64 model untouched; cache=True gives the same products twice."""
    model, task, batch, modules = tiny_lm(arch)
    P = sum(m.numel for m in modules)
    v = torch.randn(4, P, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = ggn_matvec(model, task, [batch, batch], modules)(v)
    fast = ggn_matvec(model, task, [batch, batch], modules, dtype=torch.float32, cache=True)
    for _ in range(2):  # the second call reuses the cached primal passes
        out = fast(v)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert next(model.parameters()).dtype == torch.float64
    cached64 = ggn_matvec(model, task, [batch, batch], modules, cache=True)
    torch.testing.assert_close(cached64(v), ref, **TIGHT)
    torch.testing.assert_close(cached64(v), ref, **TIGHT)


class _SoftCappedLogits(GPTNeoXForCausalLM):
    """A model whose logits are not its output layer applied to the hidden state (Gemma-2
    style soft-capping after the output layer)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


@pytest.mark.parametrize("arch", ["gpt-neox", "gpt2"])
def test_through_head_pulled_back_hessian_gives_the_same_ggn(arch):
    """Linearising to the output layer's input with H̃ = Wᵀ H W per token (through_head=True)
    is the same G as the logits path: float64 to rounding (TIGHT) against the explicit
    Jacobian construction, float32 to rtol 1e-5, both for a few right-hand sides (the
    sandwich Wᵀ H W u) and for many (H̃ built and read); gpt2 ties the output layer to the
    embedding. The caller's model keeps its output layer."""
    model, task, batch, modules = tiny_lm(arch)
    G = explicit_ggn(model, task, batch, modules)
    v = torch.randn(3, G.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    head = ggn_matvec(model, task, [batch, batch], modules, cache=True, through_head=True)
    assert head.through_head
    torch.testing.assert_close(head(v), v @ G, **TIGHT)  # few right-hand sides: Wᵀ H (W u)
    torch.testing.assert_close(head(v[0]), G @ v[0], **TIGHT)
    many = torch.randn(16, G.shape[0], dtype=torch.float64)  # ≥ 20·d/V of them: H̃ itself
    torch.testing.assert_close(head(many), many @ G, **TIGHT)
    fast = ggn_matvec(model, task, batch, modules, dtype=torch.float32, cache=True,
                      through_head=True)  # fmt: skip
    for x in (v, many):
        torch.testing.assert_close(fast(x), x @ G, rtol=1e-5, atol=1e-6 * G.abs().max().item())
    assert isinstance(model.get_output_embeddings(), nn.Linear)


def test_through_head_falls_back_or_refuses_with_the_reason():
    """auto (None) takes the logits path where the pulled-back H̃ cannot be used (no cache,
    logits post-processed after the output layer) and says so in `matvec.through_head`;
    through_head=True then raises an error that names the reason and the fix."""
    model, task, batch, modules = tiny_lm()
    assert not ggn_matvec(model, task, batch, modules).through_head  # cache=False
    with pytest.raises(ValueError, match="cache=True"):
        ggn_matvec(model, task, batch, modules, through_head=True)
    scaled = _SoftCappedLogits(model.config).double().eval()
    scaled.load_state_dict(model.state_dict())
    mods = find_modules(scaled)
    auto = ggn_matvec(scaled, task, batch, mods, cache=True)
    assert not auto.through_head
    G = explicit_ggn(scaled, task, batch, mods)
    v = torch.randn(G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(auto(v), G @ v, **TIGHT)  # the logits path, still exact
    with pytest.raises(ValueError, match="not its output layer applied"):
        ggn_matvec(scaled, task, batch, mods, cache=True, through_head=True)


@pytest.mark.parametrize("kind", ["mlp", "gpt-neox", "gpt2"])
def test_analytic_output_hessian_matches_jvp_of_grad(kind):
    """The closed form H u = p ⊙ u − p (pᵀu) per token (masked as in the loss) gives the same
    G·v as jvp-of-grad of the loss, in float64 to rounding (TIGHT), and in float32 to the
    float32 products' rtol 1e-5."""
    model, task, batch, modules = tiny_mlp() if kind == "mlp" else tiny_lm(kind)
    P = sum(m.numel for m in modules)
    v = torch.randn(3, P, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = ggn_matvec(model, task, batch, modules, analytic=False)(v)
    torch.testing.assert_close(ggn_matvec(model, task, batch, modules)(v), ref, **TIGHT)
    fast = ggn_matvec(model, task, batch, modules, dtype=torch.float32, cache=True)
    torch.testing.assert_close(fast(v), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_output_hessian_product_is_the_loss_hessian_in_the_logits():
    """task.output_hessian_product(f, batch)(u) = ∇²_f Σ_n ℓ_n · u (autograd Hessian of the
    loss in the logits; prompt, padding and last positions count zero)."""
    _, task, batch, _ = tiny_lm()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch.input_ids.shape, 7, dtype=torch.float64, generator=g)
    H = torch.autograd.functional.hessian(lambda o: task.loss_from_output(o, batch).sum(), logits)
    u = torch.randn(logits.shape, dtype=torch.float64, generator=g)
    want = (H.reshape(logits.numel(), -1) @ u.flatten()).reshape(logits.shape)
    got = task.output_hessian_product(logits, batch)(u)
    torch.testing.assert_close(got, want, **TIGHT)
    # zero where the next token is no target: the last position, a prompt token, padding
    assert got[:, -1].abs().max() == 0 and got[1, 0].abs().max() == 0
    assert got[1, 2:].abs().max() == 0 and got[0, 0].abs().max() > 0


@pytest.mark.parametrize("which", ["ggn", "hessian"])
def test_matvec_result_carries_no_autograd_graph(which):
    """Embeddings and norms are untracked but still require grad: G·v must not hold a graph."""
    model, task, batch, modules = tiny_lm()
    assert any(p.requires_grad for n, p in model.named_parameters() if "embed" in n)
    make = ggn_matvec if which == "ggn" else hessian_matvec
    P = sum(m.numel for m in modules)
    out = make(model, task, batch, modules)(torch.randn(2, P, dtype=torch.float64))
    assert not out.requires_grad and out.grad_fn is None


def test_block_diagonal_matvec_keeps_only_the_per_layer_blocks():
    """block_diagonal(G)·v = (G with every cross-layer block zeroed)·v, for 1 and K vectors;
    block_diagonal_ggn_matvec (each block linearised on its own layer) is the same matrix
    (TIGHT; float32 cached products to rtol 1e-5)."""
    model, task, batch, modules = tiny_lm()
    G = dense_ggn(model, task, batch, modules)
    mask = torch.zeros_like(G)
    start = 0
    for m in modules:
        mask[start : start + m.numel, start : start + m.numel] = 1
        start += m.numel
    assert len(modules) > 1 and (G * (1 - mask)).abs().max() > 1e-6  # cross blocks exist
    v = torch.randn(3, G.shape[0], dtype=torch.float64)
    masked = block_diagonal(ggn_matvec(model, task, batch, modules), modules)
    per_layer = block_diagonal_ggn_matvec(model, task, batch, modules)  # one J per layer
    cached32 = block_diagonal_ggn_matvec(model, task, batch, modules, dtype=torch.float32,
                                         cache=True)  # fmt: skip
    for mv in (masked, per_layer):
        torch.testing.assert_close(mv(v), v @ (G * mask), **TIGHT)
        torch.testing.assert_close(mv(v[1]), (G * mask) @ v[1], **TIGHT)
    torch.testing.assert_close(cached32(v), v @ (G * mask), rtol=1e-5,
                               atol=1e-6 * G.abs().max().item())  # fmt: skip


def test_padding_tokens_do_not_change_ggn():
    """Extra right padding (and a longer batch) leaves G unchanged."""
    model, task, batch, modules = tiny_lm()
    wider = make_token_batch(
        [[1, 2, 3, 4, 5, 0, 0], [2, 6, 1], [3, 3, 5, 2]],
        pad_id=0,
        target_masks=[[0, 1, 1, 1, 1, 0, 0], [0, 0, 1], [0, 1, 1, 1]],
    )
    wider.attention_mask[0, 5:] = 0
    torch.testing.assert_close(
        dense_ggn(model, task, wider, modules), dense_ggn(model, task, batch, modules), **TIGHT
    )


def softmax_regression(seed: int = 0, n: int = 12, d: int = 3, c: int = 4):
    torch.manual_seed(seed)
    model = nn.Linear(d, c).double()
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randint(0, c, (n,))
    return model, ClassificationTask(), (x, y), find_modules(model, exclude=None)


def test_ggn_equals_hessian_for_linear_model():
    model, task, batch, modules = softmax_regression()
    torch.testing.assert_close(
        dense_ggn(model, task, batch, modules), dense_hessian(model, task, batch, modules), **TIGHT
    )


def test_hessian_of_lm_is_symmetric_and_matches_gradient_differences():
    model, task, batch, modules = tiny_lm()
    H = dense_hessian(model, task, batch, modules)
    torch.testing.assert_close(H, H.T, **TIGHT)
    # H v ≈ (∇L(θ + h v) − ∇L(θ − h v)) / 2h, with ∇L from the per-example gradients
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h, grads = 1e-6, []  # central differences: error O(h²) ≈ 2e-7 here (|Hv| ≈ 66)
    base = {m.name: m.param_matrix().detach().clone() for m in modules}
    step = unflatten(v, modules)

    def set_params(mats):
        with torch.no_grad():
            for m in modules:
                for (_, param), t in zip(m.parameters(), m.matrix_to_params(mats[m.name])):
                    param.copy_(t)

    for sign in (1, -1):
        set_params({k: base[k] + sign * h * step[k] for k in base})
        grads.append(per_example_flat_grads(model, task, batch, modules).mean(0))
    set_params(base)
    torch.testing.assert_close(H @ v, (grads[0] - grads[1]) / (2 * h), rtol=1e-6, atol=1e-6)


def test_dropout_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    modules = find_modules(model, exclude=None)
    with pytest.raises(RuntimeError, match="model.eval"):
        dense_ggn(model, ClassificationTask(), (x, y), modules)
    model.eval()
    dense_ggn(model, ClassificationTask(), (x, y), modules)


def test_hessian_differs_from_ggn_for_mlp():
    model, task, batch, modules = tiny_mlp()
    H, G = dense_hessian(model, task, batch, modules), dense_ggn(model, task, batch, modules)
    torch.testing.assert_close(H, H.T, **TIGHT)
    assert (H - G).abs().max() > 1e-3


def test_true_fisher_by_enumerating_labels_equals_ggn():
    """E_{y ~ p(·|x)}[g gᵀ] summed exactly over all labels equals the GGN for softmax CE."""
    model, task, (x, y), modules = tiny_mlp()
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    F = torch.zeros(sum(m.numel for m in modules), sum(m.numel for m in modules), dtype=x.dtype)
    for c in range(probs.shape[1]):
        g = per_example_flat_grads(model, task, (x, torch.full_like(y, c)), modules)
        F += (g * probs[:, c : c + 1]).T @ g
    torch.testing.assert_close(F / x.shape[0], dense_ggn(model, task, (x, y), modules), **TIGHT)


def test_per_example_grads_and_empirical_fisher():
    model, task, (x, y), modules = tiny_mlp()
    g = per_example_flat_grads(model, task, (x, y), modules)
    for n in (0, 4):
        model.zero_grad()
        task.loss(model, (x[n : n + 1], y[n : n + 1])).sum().backward()
        ref = flatten({m.name: m.grad_matrix() for m in modules}, modules)
        torch.testing.assert_close(g[n], ref, **TIGHT)
    torch.testing.assert_close(empirical_fisher(model, task, (x, y), modules), g.T @ g / 7)


def test_per_example_grads_conv1d_layout():
    """GPT-2's Conv1D stores W transposed; the flat layout is still [W | b] (out, in + 1)."""
    model, task, batch, modules = tiny_lm("gpt2")
    g = per_example_flat_grads(model, task, batch, modules)
    model.zero_grad()
    task.loss(model, batch.select(slice(1, 2))).sum().backward()
    ref = flatten({m.name: m.grad_matrix() for m in modules}, modules)
    torch.testing.assert_close(g[1], ref, **TIGHT)


# ----------------------------------------------------------------------------- solvers
@pytest.fixture(scope="module")
def mlp_system():
    model, task, batch, modules = tiny_mlp()
    G = dense_ggn(model, task, batch, modules)
    gen = torch.Generator().manual_seed(1)
    v = unflatten(torch.randn(3, G.shape[0], dtype=torch.float64, generator=gen), modules)
    return model, task, batch, modules, G, v


def test_dense_solve_matches_linalg_solve(mlp_system):
    *_, modules, G, v = mlp_system
    lam = 1e-2
    out = flatten(DenseSolveIHVP(G, modules, lam).apply(v), modules)
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    ref = torch.linalg.solve(G + lam * eye, flatten(v, modules).T).T
    torch.testing.assert_close(out, ref, **TIGHT)


def test_cg_converges_to_dense_solve(mlp_system):
    model, task, batch, modules, G, v = mlp_system
    lam = 1e-2
    ref = flatten(DenseSolveIHVP(G, modules, lam).apply(v), modules)
    cg = ConjugateGradientIHVP(ggn_matvec(model, task, batch, modules), modules, lam, tol=1e-12)
    out = flatten(cg.apply(v), modules)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)
    assert cg.converged.all() and (cg.residuals < 1e-10).all()
    assert (cg.iterations <= G.shape[0] + 5).all() and (cg.iterations > 0).all()


def test_preconditioned_cg_converges_faster_to_the_same_solution(mlp_system):
    """PCG with M = (diag(G) + λ)⁻¹ (Jacobi) and with the exact inverse reaches the dense
    solve to rtol 1e-6; the exact inverse as M needs a single iteration."""
    model, task, batch, modules, G, v = mlp_system
    lam = 1e-3
    ref = flatten(DenseSolveIHVP(G, modules, lam).apply(v), modules)
    plain = ConjugateGradientIHVP(G, modules, lam, tol=1e-12)
    flatten(plain.apply(v), modules)
    inv = torch.linalg.inv(G + lam * torch.eye(G.shape[0], dtype=G.dtype))
    jacobi = 1.0 / (torch.diagonal(G) + lam)
    for M in (lambda r: r * jacobi, lambda r: r @ inv):
        pcg = ConjugateGradientIHVP(G, modules, lam, tol=1e-12, preconditioner=M)
        torch.testing.assert_close(flatten(pcg.apply(v), modules), ref, rtol=1e-6, atol=1e-8)
        assert pcg.converged.all() and (pcg.residuals < 1e-10).all()
    assert (pcg.iterations == 1).all() and (plain.iterations > 5).all()


def test_cg_float32_products_with_float64_refinement_reach_float64_accuracy(mlp_system):
    """float32 products stall CG near their own rounding; one refinement round with the
    float64 residual brings the true residual below 1e-10 (the tol) and the solution to
    the dense solve at rtol 1e-6."""
    model, task, batch, modules, G, v = mlp_system
    lam = 1e-3
    ref = flatten(DenseSolveIHVP(G, modules, lam).apply(v), modules)
    mv32 = ggn_matvec(model, task, batch, modules, dtype=torch.float32)
    exact64 = ggn_matvec(model, task, batch, modules)
    noisy = ConjugateGradientIHVP(mv32, modules, lam, tol=1e-10, max_iter=60,
                                  check_matvec=exact64)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        noisy.apply(v)
    assert (noisy.residuals > 1e-9).any()  # float32 products alone do not get there
    cg = ConjugateGradientIHVP(mv32, modules, lam, tol=1e-10, max_iter=60,
                               check_matvec=exact64, refine=4)  # fmt: skip
    out = flatten(cg.apply(v), modules)
    assert cg.converged.all() and (cg.residuals <= 1e-10).all()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-8)


def test_cg_and_lissa_snapshots_equal_shorter_runs(mlp_system):
    """x_k kept during one run = a separate run with budget k (CG and LiSSA)."""
    *_, modules, G, v = mlp_system
    lam = 1e-2
    long = ConjugateGradientIHVP(G, modules, lam, max_iter=12, tol=0.0, snapshots=(3, 7))
    flatten(long.apply(v), modules)
    for k in (3, 7):
        short = flatten(ConjugateGradientIHVP(G, modules, lam, max_iter=k, tol=0.0).apply(v),
                        modules)  # fmt: skip
        torch.testing.assert_close(long.snapshot_solutions[k], short, **TIGHT)
    top = torch.linalg.eigvalsh(G).max().item() + lam
    deep = LissaIHVP(G, modules, lam, depth=20, scale=top, snapshots=(5,))
    flatten(deep.apply(v), modules)
    shallow = flatten(LissaIHVP(G, modules, lam, depth=5, scale=top).apply(v), modules)
    torch.testing.assert_close(deep.snapshot_solutions[5], shallow, **TIGHT)
    with pytest.raises(ValueError, match="without a preconditioner"):
        ConjugateGradientIHVP(G, modules, lam, snapshots=(2,), preconditioner=lambda r: r)
    with pytest.raises(ValueError, match="1..depth"):
        LissaIHVP(G, modules, lam, depth=5, snapshots=(6,))


def test_cg_reports_non_convergence(mlp_system):
    *_, modules, G, v = mlp_system
    cg = ConjugateGradientIHVP(G, modules, 1e-4, max_iter=2)
    with pytest.warns(UserWarning, match="raise max_iter"):
        cg.apply(v)
    assert not cg.converged.any() and (cg.iterations == 2).all() and (cg.residuals > 1e-6).all()


def test_cg_time_limit_stops_and_reports(mlp_system):
    """time_limit_s=0: no iteration runs, the queries are reported as not converged; a generous
    limit changes nothing."""
    *_, modules, G, v = mlp_system
    cg = ConjugateGradientIHVP(G, modules, 1e-2, tol=1e-10, time_limit_s=0.0, refine=1,
                               check_matvec=G)  # fmt: skip
    with pytest.warns(UserWarning, match="did not reach"):
        cg.apply(v)
    assert cg.stopped_by_time and (cg.iterations == 0).all() and not cg.converged.any()
    free = ConjugateGradientIHVP(G, modules, 1e-2, tol=1e-10, time_limit_s=600.0)
    free.apply(v)
    assert not free.stopped_by_time and free.converged.all()


def test_lissa_converges_to_dense_solve(mlp_system):
    *_, modules, G, v = mlp_system
    lam = 0.1
    top = torch.linalg.eigvalsh(G).max().item() + lam
    ref = flatten(DenseSolveIHVP(G, modules, lam).apply(v), modules)
    lissa = LissaIHVP(G, modules, lam, depth=3000, scale=top)
    out = flatten(lissa.apply(v), modules)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-6)
    assert (lissa.increments < 1e-6).all()


def test_lissa_divergence_names_the_setting(mlp_system):
    *_, modules, G, v = mlp_system
    top = torch.linalg.eigvalsh(G).max().item()
    with pytest.raises(FloatingPointError, match="Raise `scale`"):
        LissaIHVP(G, modules, 0.1, depth=500, scale=top / 4).apply(v)


def test_ihvp_protocol_shapes(mlp_system):
    *_, modules, G, v = mlp_system
    for ihvp in (DenseSolveIHVP(G, modules, 0.1), ConjugateGradientIHVP(G, modules, 0.1),
                 LissaIHVP(G, modules, 0.1, depth=10, scale=10.0)):  # fmt: skip
        assert isinstance(ihvp.name, str)
        out = ihvp.apply(v)
        assert {k: t.shape for k, t in out.items()} == {k: t.shape for k, t in v.items()}
        one = ihvp.apply({k: t[0] for k, t in v.items()})  # a single vector (out, d_in)
        assert {k: t.shape for k, t in one.items()} == {k: t.shape[1:] for k, t in v.items()}


# ----------------------------------------------------------------------------- errors
def test_zero_damping_on_singular_G_is_an_error():
    model, task, batch, modules = softmax_regression(n=2)  # P = 16 ≫ rank ≤ 2·3
    G = dense_ggn(model, task, batch, modules)
    v = unflatten(torch.ones(1, G.shape[0], dtype=G.dtype), modules)
    with pytest.raises(ValueError, match=r"G\+λI is singular: set damping > 0"):
        DenseSolveIHVP(G, modules, 0.0)
    with pytest.raises(ValueError, match=r"G\+λI is singular"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ConjugateGradientIHVP(torch.zeros_like(G), modules, 0.0).apply(v)
    DenseSolveIHVP(G, modules, 1e-3)  # fine with damping


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_invalid_damping(bad):
    *_, modules = softmax_regression()
    G = torch.eye(16, dtype=torch.float64)
    for make in (DenseSolveIHVP, ConjugateGradientIHVP, LissaIHVP):
        with pytest.raises(ValueError, match="damping"):
            make(G, modules, bad)


def test_nan_inputs_raise_floating_point_error():
    *_, modules = softmax_regression()
    G = torch.eye(16, dtype=torch.float64)
    bad_G = G.clone()
    bad_G[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        DenseSolveIHVP(bad_G, modules, 0.1)
    v = unflatten(torch.ones(2, 16, dtype=torch.float64), modules)
    v[modules[0].name][0, 0, 0] = float("inf")
    for ihvp in (DenseSolveIHVP(G, modules, 0.1), ConjugateGradientIHVP(G, modules, 0.1),
                 LissaIHVP(G, modules, 0.1, depth=5, scale=2.0)):  # fmt: skip
        with pytest.raises(FloatingPointError):
            ihvp.apply(v)
    with pytest.raises(FloatingPointError):
        ConjugateGradientIHVP(bad_G, modules, 0.1).apply(unflatten(torch.ones(1, 16), modules))


def test_influence_exact_is_dense_formula():
    model, task, (x, y), modules = tiny_mlp()
    G, lam = dense_ggn(model, task, (x, y), modules), 0.05
    scores = influence_exact(model, task, (x[:2], y[:2]), (x, y), modules, G, lam)
    qg = per_example_flat_grads(model, task, (x[:2], y[:2]), modules, measurement=True)
    cg = per_example_flat_grads(model, task, (x, y), modules)
    ref = qg @ torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), cg.T)
    assert scores.shape == (2, 7)
    torch.testing.assert_close(scores, ref, **TIGHT)

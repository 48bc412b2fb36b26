"""measure_stationarity against dense references: ‖∇J‖ by one autograd call on the whole
objective, per-example gradient norms by torch.func, and two answers known in advance (a
convex model trained to convergence: relative ≈ 0; identical examples away from the
optimum: relative = 1)."""

from __future__ import annotations

import pytest
import torch
from conftest import lm_batch, make_lm
from torch import nn
from torch.func import functional_call, grad, vmap

from msif_lite.engine.tasks import ClassificationTask, LanguageModelingTask
from msif_lite.eval.stationarity import Normalisation, measure_stationarity

LAM = 0.1


def problem(seed: int = 0, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    return nn.Linear(5, 3).double(), x, y


def l2(model: nn.Module):
    return lambda: 0.5 * LAM * sum((p ** 2).sum() for p in model.parameters())


def objective(model, x, y):
    return nn.functional.cross_entropy(model(x), y) + l2(model)()


def batches(x, y, size=5):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_matches_dense_references():
    model, x, y = problem()
    got = measure_stationarity(model, ClassificationTask(), batches(x, y), penalty=l2(model),
                               normalisation=Normalisation.EXAMPLE_MEAN)["all"]
    params = list(model.parameters())
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective(model, x, y), params)])
    data = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        nn.functional.cross_entropy(model(x), y), params)])
    named = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    detached = {k: v.detach() for k, v in named.items()}
    per = vmap(grad(loss_one), in_dims=(None, 0, 0))(detached, x, y)
    per_norm = torch.cat([per[k].reshape(len(x), -1) for k in named], dim=1).norm(dim=1).mean()
    assert got.gradient_norm == pytest.approx(float(full.norm()), rel=1e-10)
    assert got.data_gradient_norm == pytest.approx(float(data.norm()), rel=1e-10)
    assert got.example_gradient_norm == pytest.approx(float(per_norm), rel=1e-10)
    assert got.penalty_gradient_norm == pytest.approx(
        LAM * float(torch.cat([p.detach().reshape(-1) for p in params]).norm()), rel=1e-10)
    assert got.n_examples == len(x)


def test_converged_convex_model_is_stationary_and_init_is_not():
    model, x, y = problem()
    kw = dict(penalty=l2(model), normalisation="example_mean")
    at_init = measure_stationarity(model, ClassificationTask(), batches(x, y), **kw)["all"]
    opt = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-14,
                            tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    done = measure_stationarity(model, ClassificationTask(), batches(x, y), **kw)["all"]
    assert at_init.relative > 0.1, at_init
    assert done.relative < 1e-8, done
    # at the optimum the data gradient is balanced by the penalty's, neither is small
    assert done.data_gradient_norm == pytest.approx(done.penalty_gradient_norm, rel=1e-6)
    assert done.data_gradient_norm > 1e-3


def test_identical_examples_give_relative_one_and_groups_split():
    model, x, y = problem()
    xs, ys = x[:1].repeat(6, 1), y[:1].repeat(6)
    groups = {"all": list(model.parameters()), "weight": [model.weight]}
    got = measure_stationarity(model, ClassificationTask(), batches(xs, ys, 4), groups=groups,
                               normalisation=Normalisation.EXAMPLE_MEAN)
    assert got["all"].relative == pytest.approx(1.0, rel=1e-12)
    w = torch.autograd.grad(nn.functional.cross_entropy(model(xs), ys), model.weight)[0]
    assert got["weight"].gradient_norm == pytest.approx(float(w.norm()), rel=1e-10)


def test_token_mean_is_the_hugging_face_batch_loss():
    model = make_lm("gpt_neox")
    whole = lm_batch()
    parts = [lm_batch([0, 1]), lm_batch([2, 3, 4])]
    got = measure_stationarity(model, LanguageModelingTask(), parts)["all"]
    params = list(model.parameters())
    logits = model(input_ids=whole.input_ids, attention_mask=whole.attention_mask).logits
    mean = nn.functional.cross_entropy(  # the mean over every target token of the batch
        logits[:, :-1].reshape(-1, logits.shape[-1]), whole.labels[:, 1:].reshape(-1))
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(mean, params)])
    assert got.gradient_norm == pytest.approx(float(ref.norm()), rel=1e-10)
    hf = model(input_ids=whole.input_ids, attention_mask=whole.attention_mask,
               labels=whole.labels).loss  # the loss the kit trains with (upcast to float32)
    ref_hf = torch.cat([g.reshape(-1) for g in torch.autograd.grad(hf, params)])
    assert got.gradient_norm == pytest.approx(float(ref_hf.norm()), rel=1e-6)
    assert 0 < got.relative <= 1


def test_refusals():
    model, x, y = problem()
    with pytest.raises(ValueError, match="EXAMPLE_MEAN"):
        measure_stationarity(model, ClassificationTask(), batches(x, y))
    with pytest.raises(ValueError, match="no examples"):
        measure_stationarity(model, ClassificationTask(), [], normalisation="example_mean")
    frozen = nn.Parameter(torch.zeros(2, dtype=torch.float64), requires_grad=False)
    with pytest.raises(ValueError, match="require grad"):
        measure_stationarity(model, ClassificationTask(), batches(x, y), groups={"f": [frozen]},
                             normalisation="example_mean")
    with pytest.raises(ValueError):
        measure_stationarity(model, ClassificationTask(), batches(x, y), normalisation="tokens")

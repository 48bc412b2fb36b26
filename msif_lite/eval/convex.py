"""Retraining references on small convex problems (notebooks 01, 07, 10): exact refits by
Newton's method, with examples removed or up-weighted, and for the two-stage problem an
anchored (proximity) fine-tune. Influence is checked against these in the tests.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from msif_lite.engine.functional import OutputOf, param_key
from msif_lite.engine.tasks import Task


def trainable_vector(model: nn.Module) -> Tensor:
    """All trainable parameters as one flat vector (`named_parameters()` order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def fit_convex(model: nn.Module, task: Task, batch, l2: float, weights: Tensor | None = None,
               *, anchor: Tensor | None = None, tol: float = 1e-10,
               max_iter: int = 100) -> dict:  # fmt: skip
    """Newton's method on (1/N) Σ_n w_n ℓ(z_n, θ) + (l2/2)‖θ − θ₀‖² over all trainable
    parameters, θ₀ = `anchor` (a `trainable_vector`) or 0.

    With anchor = θ_pt and l2 = α this is the proximity-constrained fine-tune of
    Notebook 07 §Checking against retraining.

    For small convex models (softmax regression); w_n = 0 removes z_n, and w_n = 1 + Nε
    up-weights it by ε (Notebook 01 §The check that counts). Updates `model` in place and
    returns {"grad_norm", "iterations"}; warns if ‖∇‖ > tol at the end.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]
    theta = trainable_vector(model)
    wrapped, n = OutputOf(model, task), task.batch_size(batch)
    w = (torch.ones(n, dtype=theta.dtype) if weights is None else weights).to(theta)

    def unpack(t: Tensor) -> dict[str, Tensor]:
        return {param_key(k): c.view_as(p) for (k, p), c in zip(named, t.split(sizes))}

    def objective(t: Tensor) -> Tensor:
        loss = task.loss_from_output(functional_call(wrapped, unpack(t), (batch,)), batch)
        d = t if anchor is None else t - anchor
        return (w * loss).sum() / n + 0.5 * l2 * (d * d).sum()

    g_fn, h_fn = torch.func.grad(objective), torch.func.hessian(objective)
    steps = 0
    while steps < max_iter:
        g = g_fn(theta)
        if g.norm() < tol:
            break
        steps += 1
        step = torch.linalg.solve(h_fn(theta), -g)
        f0, t = objective(theta), 1.0
        while t > 1e-10:  # Armijo backtracking; changes at rounding level count as progress
            f1 = objective(theta + t * step)
            if f1 <= f0 + 1e-4 * t * (g @ step) or f1 - f0 <= 1e-14 * f0.abs():
                break
            t /= 2
        theta = theta + t * step
    gnorm = g_fn(theta).norm().item()
    if gnorm > tol:
        warnings.warn(f"fit_convex: ‖∇‖ = {gnorm:.2e} > tol={tol} after {steps} Newton steps",
                      stacklevel=2)  # fmt: skip
    with torch.no_grad():
        for (_, p), c in zip(named, theta.split(sizes)):
            p.copy_(c.view_as(p))
    return {"grad_norm": gnorm, "iterations": steps}


def loo_changes(model: nn.Module, task: Task, train_batch, query_batch, l2: float,
                indices: Sequence[int], *, tol: float = 1e-10) -> Tensor:  # fmt: skip
    """(len(indices), Q) actual m(q, θ*_{−i}) − m(q, θ*) by retraining without z_i.

    `model` must already be fitted with `fit_convex(..., l2)`; the predicted change is
    +I(z_i, q)/N with damping = l2 (removal = up-weighting by ε = −1/N).
    """
    with torch.no_grad():
        base = task.measurement(model, query_batch).detach()
    n, rows = task.batch_size(train_batch), []
    for i in indices:
        m = copy.deepcopy(model)
        w = torch.ones(n, dtype=torch.float64)
        w[i] = 0.0
        fit_convex(m, task, train_batch, l2, w, tol=tol)
        with torch.no_grad():
            rows.append(task.measurement(m, query_batch).detach() - base)
    return torch.stack(rows)

"""Exact references that every approximation in the kit is checked against (tiny models only).

Everything here works in the flat layout of `engine.layers.flatten` (row-major [W | b] per
layer, so a layer's Kronecker block is `torch.kron(S, A)`), over the tracked layers'
parameters only; the rest of the model is frozen. Conventions (docs/design.md
§Conventions): per-example losses are token sums, I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z),
and up-weighting z by ε gives dm/dε = −I.

This module holds the dense matrices and gradients (G, H, F, per-example gradients, dense
influence) and re-exports the rest, so `from msif_lite.engine.exact import X` reaches every
reference: the products G v, H v and their block diagonals live in `exact_products`, the
solvers (dense, CG, LiSSA, precomputed) in `exact_solvers`, the `torch.func` plumbing in
`functional`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from msif_lite.engine.exact_products import (  # noqa: F401 - re-exported: the exact references
    PULLED_BACK_MAX_HIDDEN,
    PULLED_BACK_MAX_MB,
    _through_head,
    block_diagonal,
    block_diagonal_ggn_matvec,
    ggn_matvec,
    hessian_matvec,
    pulled_back_hessian,
)
from msif_lite.engine.exact_solvers import (  # noqa: F401
    ConjugateGradientIHVP,
    DenseSolveIHVP,
    LissaIHVP,
    PrecomputedIHVP,
    _FlatIHVP,
)
from msif_lite.engine.functional import (  # noqa: F401
    Matvec,
    OutputOf,
    _as_list,
    _check_eval,
    math_sdpa,
    modules_of,
    param_key,
    to_flat,
    to_params,
    tracked_params,
)
from msif_lite.engine.layers import TrackedModule
from msif_lite.engine.tasks import Fisher, Task


def _dense(matvec: Matvec, modules: Sequence[TrackedModule], chunk: int) -> Tensor:
    p = sum(m.numel for m in modules)
    dtype = modules[0].weight_matrix().dtype
    eye = torch.eye(p, dtype=dtype)
    cols = [matvec(eye[i : i + chunk]) for i in range(0, p, chunk)]
    out = torch.cat(cols, dim=0)
    return (out + out.T) / 2  # symmetric up to rounding; remove the rounding asymmetry


def dense_ggn(model, task: Task, batches, modules, *, chunk: int = 128) -> Tensor:
    """(P, P) GGN: `ggn_matvec` applied to the identity, `chunk` columns at a time."""
    return _dense(ggn_matvec(model, task, batches, modules), modules, chunk)


def dense_hessian(model, task: Task, batches, modules, *, chunk: int = 128) -> Tensor:
    """(P, P) Hessian of the mean training loss over the tracked layers (Notebook 02)."""
    return _dense(hessian_matvec(model, task, batches, modules), modules, chunk)


def per_example_flat_grads(
    model: nn.Module,
    task: Task,
    batches,
    modules: Sequence[TrackedModule],
    *,
    fisher: Fisher = "empirical",
    generator: torch.Generator | None = None,
    measurement: bool = False,
) -> Tensor:
    """(N, P): ∇_θ ℓ(z_n) (or ∇m(q_n) with measurement=True), one backward per example.

    Deliberately plain autograd, independent of the engine's hooks in capture.py.
    """
    _check_eval(model)
    params = [p for m in modules for _, p in m.parameters()]
    rows = []
    for batch in _as_list(batches):
        if measurement:
            losses = task.measurement(model, batch)
        else:
            losses = task.loss(model, batch, fisher=fisher, generator=generator)
        for n in range(losses.shape[0]):
            gs = torch.autograd.grad(losses[n], params, retain_graph=True, allow_unused=True)
            gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
            d = dict(zip([param_key(k) for m in modules for k, _ in m.parameters()], gs))
            rows.append(to_flat(d, modules))
    return torch.stack(rows).detach()


def empirical_fisher(model, task: Task, batches, modules, **kw) -> Tensor:
    """(P, P) F = (1/N) Σ_n g_n g_nᵀ with g_n = ∇ℓ(z_n) for the data labels (Notebook 02)."""
    g = per_example_flat_grads(model, task, batches, modules, **kw)
    return g.T @ g / g.shape[0]


def influence_exact(model, task: Task, queries, candidates, modules, G: Tensor,
                    damping: float) -> Tensor:  # fmt: skip
    """(Q, N) scores I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z), fully dense (Notebook 01)."""
    qg = per_example_flat_grads(model, task, queries, modules, measurement=True)
    cg = per_example_flat_grads(model, task, candidates, modules)
    return DenseSolveIHVP(G, modules, damping).solve(qg) @ cg.T

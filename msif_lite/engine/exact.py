"""Exact references that every approximation in the kit is checked against (tiny models only).

Everything here works in the flat layout of `engine.layers.flatten` (row-major [W | b] per
layer, so a layer's Kronecker block is `torch.kron(S, A)`), over the tracked layers'
parameters only; the rest of the model is frozen. Conventions (docs/design.md
§Conventions): per-example losses are token sums, I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z),
and up-weighting z by ε gives dm/dε = −I.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from msif_lite.engine.layers import Grads, TrackedModule, check_finite, flatten, unflatten
from msif_lite.engine.tasks import Fisher, Task

Matvec = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- plumbing
class _OutputOf(nn.Module):
    """Wraps `task.output(model, batch)` so `functional_call` can swap the parameters."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, batch):
        return self.task.output(self.model, batch)


def _as_list(batches) -> list:
    """A list is a list of batches; anything else (a tuple (x, y), a TokenBatch) is one batch."""
    return list(batches) if isinstance(batches, list) else [batches]


def _math_sdpa():
    """Forward-mode AD needs the composite SDPA kernel (the fused CPU one has no jvp)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        return nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _key(name: str) -> str:
    """Parameter name inside `_OutputOf` (a bare nn.Linear model has layer name '')."""
    return "model." + name


def _check_eval(model: nn.Module) -> None:
    """Active dropout makes every forward pass a different function: refuse it."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in model.modules()):
        raise RuntimeError("exact references need a deterministic model: call model.eval() "
                           "(dropout is active)")  # fmt: skip


def _tracked(modules: Sequence[TrackedModule]) -> dict[str, Tensor]:
    return {_key(n): p.detach() for m in modules for n, p in m.parameters()}


def _to_params(vec: Tensor, modules: Sequence[TrackedModule]) -> dict[str, Tensor]:
    """Flat (..., P) → {'model.<layer>.weight': ..., ...} (Conv1D weights transposed back)."""
    mats, out = unflatten(vec, modules), {}
    for m in modules:
        for (n, _), t in zip(m.parameters(), m.matrix_to_params(mats[m.name])):
            out[_key(n)] = t
    return out


def _to_flat(params: dict[str, Tensor], modules: Sequence[TrackedModule]) -> Tensor:
    mats = {}
    for m in modules:
        ws = [params[_key(n)] for n, _ in m.parameters()]
        mats[m.name] = m.params_to_matrix(ws[0], ws[1] if m.has_bias else None)
    return flatten(mats, modules)


def _n_examples(task: Task, batches: list) -> int:
    return sum(task.batch_size(b) for b in batches)


def _check_vec(v: Tensor, what: str) -> None:
    if not torch.isfinite(v).all():
        raise FloatingPointError(f"{what} contain NaN or inf; check the inputs and the model.")


# ----------------------------------------------------------------------------- curvature
def ggn_matvec(
    model: nn.Module, task: Task, batches, modules: Sequence[TrackedModule], *, average: bool = True
) -> Matvec:
    """v ↦ G v with G = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n, exact (Notebook 02 §Derivation).

    J_n = ∂f(z_n)/∂θ over the tracked layers (jvp), ∇²_f ℓ_n by jvp-of-grad of
    `task.loss_from_output` (so padding and labels = −100 count exactly as in the loss),
    then Jᵀ by vjp. Accepts v of shape (P,) or (K, P); average=False gives the sum.
    """
    _check_eval(model)
    wrapped, batches = _OutputOf(model, task), _as_list(batches)
    p0 = _tracked(modules)
    scale = 1.0 / _n_examples(task, batches) if average else 1.0

    def matvec(v: Tensor) -> Tensor:
        vs = v.reshape(-1, v.shape[-1])
        tangents = _to_params(vs.to(next(iter(p0.values())).dtype), modules)
        total = torch.zeros_like(vs)
        # no_grad: the untracked parameters (embeddings, norms) still require grad, and the
        # torch.func transforms below ignore an outer no_grad, so G v carries no autograd graph
        with _math_sdpa(), torch.no_grad():
            for batch in batches:
                f = lambda p, b=batch: functional_call(wrapped, p, (b,))  # noqa: E731
                dloss = grad(lambda o, b=batch: task.loss_from_output(o, b).sum())
                out, vjp_fn = vjp(f, p0)

                def one(t, f=f, dloss=dloss, out=out, vjp_fn=vjp_fn):
                    jv = jvp(f, (p0,), (t,))[1]
                    return vjp_fn(jvp(dloss, (out,), (jv,))[1])[0]

                total += _to_flat(vmap(one)(tangents), modules).to(total.dtype)
        return (total * scale).reshape(v.shape)

    return matvec


def hessian_matvec(
    model: nn.Module, task: Task, batches, modules: Sequence[TrackedModule]
) -> Matvec:
    """v ↦ H v, H = ∇²_θ (1/N) Σ_n ℓ_n over the tracked layers (forward-over-reverse)."""
    _check_eval(model)
    wrapped, batches = _OutputOf(model, task), _as_list(batches)
    p0, n = _tracked(modules), _n_examples(task, batches)

    def matvec(v: Tensor) -> Tensor:
        vs = v.reshape(-1, v.shape[-1])
        tangents = _to_params(vs.to(next(iter(p0.values())).dtype), modules)
        total = torch.zeros_like(vs)
        with _math_sdpa(), torch.no_grad():  # as in ggn_matvec: no graph through the result
            for b in batches:
                loss = lambda p, b=b: task.loss_from_output(functional_call(wrapped, p, (b,)), b)  # noqa: E731
                g = grad(lambda p, loss=loss: loss(p).sum())
                total += _to_flat(vmap(lambda t, g=g: jvp(g, (p0,), (t,))[1])(tangents), modules)
        return (total / n).reshape(v.shape)

    return matvec


def block_diagonal(matvec: Matvec, modules: Sequence[TrackedModule]) -> Matvec:
    """v ↦ diag(G_11, …, G_LL) v: the per-layer blocks of G only (Notebook 04 §Influence rankings).

    What K-FAC and EK-FAC approximate; comparing it with the full G measures what dropping
    the cross-layer blocks costs. One call of `matvec` on L·K masked copies of v (L layers).
    """
    sizes = [m.numel for m in modules]

    def block_matvec(v: Tensor) -> Tensor:
        vs = v.reshape(-1, v.shape[-1])
        masked = vs.new_zeros(len(sizes), *vs.shape)  # (L, K, P), on v's device
        for layer, (lo, part) in enumerate(zip(vs.split(sizes, dim=-1), masked.unbind(0))):
            part.split(sizes, dim=-1)[layer].copy_(lo)
        out = matvec(masked.reshape(-1, vs.shape[-1])).reshape(masked.shape)
        blocks = [out[layer].split(sizes, dim=-1)[layer] for layer in range(len(sizes))]
        return torch.cat(blocks, dim=-1).reshape(v.shape)

    return block_matvec


def _dense(matvec: Matvec, modules: Sequence[TrackedModule], chunk: int) -> Tensor:
    p = sum(m.numel for m in modules)
    dtype = modules[0].module.weight.dtype
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
            d = dict(zip([_key(k) for m in modules for k, _ in m.parameters()], gs))
            rows.append(_to_flat(d, modules))
    return torch.stack(rows).detach()


def empirical_fisher(model, task: Task, batches, modules, **kw) -> Tensor:
    """(P, P) F = (1/N) Σ_n g_n g_nᵀ with g_n = ∇ℓ(z_n) for the data labels (Notebook 02)."""
    g = per_example_flat_grads(model, task, batches, modules, **kw)
    return g.T @ g / g.shape[0]


# ----------------------------------------------------------------------------- inverse HVPs
def _check_damping(damping: float) -> float:
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


class _FlatIHVP:
    """Shared plumbing: Grads (…, out, d_in) per layer ↔ flat (K, P)."""

    name = "flat"

    def __init__(self, modules: Sequence[TrackedModule]):
        self.modules = list(modules)

    def apply(self, vectors: Grads) -> Grads:
        check_finite(vectors, "IHVP input vectors")
        flat = flatten(vectors, self.modules)
        lead = flat.shape[:-1]
        out = self.solve(flat.reshape(-1, flat.shape[-1]))
        return unflatten(out.reshape(*lead, -1).to(flat.dtype), self.modules)

    def solve(self, b: Tensor) -> Tensor:  # (K, P) → (K, P)
        raise NotImplementedError


class DenseSolveIHVP(_FlatIHVP):
    """(G + λI)⁻¹ v by a dense eigendecomposition of the symmetric G (Notebook 04)."""

    name = "dense"

    def __init__(self, G: Tensor, modules: Sequence[TrackedModule], damping: float):
        super().__init__(modules)
        self.damping = _check_damping(damping)
        p = sum(m.numel for m in self.modules)
        if G.shape != (p, p):
            raise ValueError(f"G has shape {tuple(G.shape)}, the tracked layers need ({p}, {p})")
        _check_vec(G, "G")
        evals, self.evecs = torch.linalg.eigh((G + G.T) / 2)
        shifted = evals + self.damping
        tiny = p * torch.finfo(G.dtype).eps * max(shifted.abs().max().item(), 1e-300)
        if shifted.abs().min().item() <= tiny:
            raise ValueError(
                f"G+λI is singular: set damping > 0 (smallest |eigenvalue| "
                f"{shifted.abs().min().item():.2e} with damping={self.damping})"
            )
        self.inv_evals = 1.0 / shifted

    def solve(self, b: Tensor) -> Tensor:
        q = self.evecs
        return ((b.to(q.dtype) @ q) * self.inv_evals) @ q.T


def _as_matvec(matvec: Matvec | Tensor) -> Matvec:
    if isinstance(matvec, Tensor):
        g = matvec
        return lambda v: v.to(g.dtype) @ g.T
    return matvec


class ConjugateGradientIHVP(_FlatIHVP):
    """(G + λI)⁻¹ v by conjugate gradient, batched over queries (Notebook 04 §Iterative solvers).

    After `apply`, `iterations` (K,), `residuals` (K,) = ‖b − (G+λI)x‖/‖b‖ (recomputed, not
    the recursive estimate) and `converged` (K,) describe each query's solve.
    """

    name = "cg"

    def __init__(self, matvec: Matvec | Tensor, modules, damping: float, max_iter: int = 500,
                 tol: float = 1e-10, progress: bool = False):  # fmt: skip
        super().__init__(modules)
        self.matvec, self.damping = _as_matvec(matvec), _check_damping(damping)
        self.max_iter, self.tol, self.progress = max_iter, tol, progress

    def _A(self, x: Tensor) -> Tensor:
        y = self.matvec(x) + self.damping * x
        _check_vec(y, "(G+λI)v products")
        return y

    def solve(self, b: Tensor) -> Tensor:
        bnorm = b.norm(dim=1)
        x, r = torch.zeros_like(b), b.clone()
        p, rr = r.clone(), (r * r).sum(1)
        active = bnorm > 0
        self.iterations = torch.zeros(b.shape[0], dtype=torch.long)
        ray_max = torch.zeros(b.shape[0], dtype=b.dtype)
        for _ in tqdm(range(self.max_iter), desc="CG", disable=not self.progress, leave=False):
            if not active.any():
                break
            ap = self._A(p)
            pap, pp = (p * ap).sum(1), (p * p).sum(1)
            ray = pap / pp.clamp_min(1e-300)
            ray_max = torch.maximum(ray_max, torch.where(active, ray, 0))
            if (active & (ray <= 10 * torch.finfo(b.dtype).eps * ray_max)).any():
                raise ValueError("G+λI is singular: set damping > 0 (CG met a direction "
                                 "with pᵀ(G+λI)p ≈ 0)")  # fmt: skip
            alpha = torch.where(active, rr / pap, 0)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            rr_new = (r * r).sum(1)
            self.iterations += active.long()
            active = active & (rr_new.sqrt() > self.tol * bnorm)
            p = r + torch.where(active, rr_new / rr.clamp_min(1e-300), 0)[:, None] * p
            rr = rr_new
        self.residuals = (b - self._A(x)).norm(dim=1) / bnorm.clamp_min(1e-300)
        self.converged = ~active
        if active.any():
            warnings.warn(
                f"CG: {int(active.sum())} of {b.shape[0]} queries did not reach tol={self.tol} in "
                f"max_iter={self.max_iter} (worst relative residual "
                f"{self.residuals.max().item():.2e}); raise max_iter or damping.",
                stacklevel=2,
            )
        return x


class LissaIHVP(_FlatIHVP):
    """LiSSA: v_{j+1} = v + (I − (G+λI)/scale) v_j, v_0 = v; returns v_J / scale.

    Converges when scale > λ_max(G+λI)/2 (Notebook 04 §Iterative solvers); the truncation
    error after J steps decays like (1 − (λ_min+λ)/scale)^J. After `apply`,
    `increments` (K,) = ‖v_J − v_{J−1}‖/‖v_J‖ says how settled each query is.
    """

    name = "lissa"

    def __init__(self, matvec: Matvec | Tensor, modules, damping: float, depth: int = 1000,
                 scale: float = 10.0, progress: bool = False):  # fmt: skip
        super().__init__(modules)
        self.matvec, self.damping = _as_matvec(matvec), _check_damping(damping)
        if not scale > 0:
            raise ValueError(f"LiSSA scale must be > 0, got {scale!r}")
        self.depth, self.scale, self.progress = depth, float(scale), progress

    def solve(self, b: Tensor) -> Tensor:
        cur, d0, prev = b.clone(), None, None
        for j in tqdm(range(self.depth), desc="LiSSA", disable=not self.progress, leave=False):
            step = cur - (self.matvec(cur) + self.damping * cur) / self.scale
            _check_vec(step, "LiSSA iterates")
            d = (b + step - cur).norm(dim=1)
            cur = b + step
            d0 = d if d0 is None else d0
            if (d > 2 * d0 + 1e-300).any():
                ratio = (d / prev.clamp_min(1e-300)).max().item()
                top = self.scale * (1 + ratio)
                raise FloatingPointError(
                    f"LiSSA diverged at step {j}: scale={self.scale:g} is below "
                    f"λ_max(G+λI)/2 ≈ {top / 2:.3g} (λ_max(G+λI) ≈ {top:.3g}). Raise `scale` "
                    f"above {top / 2:.3g}; scale = λ_max ≈ {top:.3g} (or more) is safe."
                )
            prev = d
        self.increments = prev / cur.norm(dim=1).clamp_min(1e-300) if prev is not None else None
        return cur / self.scale


def influence_exact(model, task: Task, queries, candidates, modules, G: Tensor,
                    damping: float) -> Tensor:  # fmt: skip
    """(Q, N) scores I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z), fully dense (Notebook 01)."""
    qg = per_example_flat_grads(model, task, queries, modules, measurement=True)
    cg = per_example_flat_grads(model, task, candidates, modules)
    return DenseSolveIHVP(G, modules, damping).solve(qg) @ cg.T


# ----------------------------------------------------------------------------- retraining

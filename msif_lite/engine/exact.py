"""Exact references that every approximation in the kit is checked against (tiny models only).

Everything here works in the flat layout of `engine.layers.flatten` (row-major [W | b] per
layer, so a layer's Kronecker block is `torch.kron(S, A)`), over the tracked layers'
parameters only; the rest of the model is frozen. Conventions (docs/design.md
§Conventions): per-example losses are token sums, I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z),
and up-weighting z by ε gives dm/dε = −I.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace

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
    model: nn.Module,
    task: Task,
    batches,
    modules: Sequence[TrackedModule],
    *,
    average: bool = True,
    dtype: torch.dtype | None = None,
    cache: bool = False,
    analytic: bool = True,
    through_head: bool | None = None,
) -> Matvec:
    """v ↦ G v with G = (1/N) Σ_n J_nᵀ (∇²_f ℓ_n) J_n, exact (Notebook 02 §Derivation).

    J_n = ∂f(z_n)/∂θ over the tracked layers (jvp), then ∇²_f ℓ_n, then Jᵀ by vjp. The
    output Hessian: with analytic=True and a task that has `output_hessian_product` (softmax
    cross-entropy: H u = p ⊙ u − p (pᵀu) per token, masked as in the loss), that closed form,
    with p computed once per batch; otherwise (analytic=False, or another task) jvp-of-grad
    of `task.loss_from_output` (so padding and labels = −100 count exactly as in the loss).
    Accepts v of shape (P,) or (K, P): the K right-hand sides go through each batch together
    (vmap), sharing one primal pass; average=False gives the sum.

    dtype: the products' precision (e.g. float32 on a float64 model: a float32 copy of
    the model computes G v, the result comes back in v's dtype; ~4× faster on CPU, with a
    relative error of ~1e-6, see tests/test_exact.py). cache=True keeps each batch's
    primal pass and vjp closure (its activations) across calls: one forward less per
    batch per call, at the memory of every batch's activations.

    through_head: linearise to the input h of an untracked linear output layer (logits =
    W h + b) and use the output Hessian pulled back through it, H̃_t = Wᵀ H_t W per token
    (d × d, computed once per batch and cached): G = Jₕᵀ H̃ Jₕ is the same matrix, but no
    product touches the V-sized logits (see `pulled_back_hessian`). None (default): where it
    pays (cache=True, closed-form H, hidden size d < V and d ≤ `PULLED_BACK_MAX_HIDDEN`, as
    building H̃ costs about d/4 products per right-hand side, and the H̃ of every batch within
    `PULLED_BACK_MAX_MB`); True: required (an error says why it cannot); False: never.
    `matvec.through_head` says which path was taken.
    """
    _check_eval(model)
    owned = dtype is not None and dtype != next(model.parameters()).dtype
    if owned:
        model = copy.deepcopy(model).to(dtype)
    batches = _as_list(batches)
    mods = modules_of(model, modules)
    closed_form = analytic and hasattr(task, "output_hessian_product")
    model, head = _through_head(model, task, batches, mods, through_head, cache and closed_form,
                                owned)  # fmt: skip
    mods = modules_of(model, modules)
    wrapped = _OutputOf(model, task)
    p0 = _tracked(mods)
    scale = 1.0 / _n_examples(task, batches) if average else 1.0
    work, dev = next(iter(p0.values())).dtype, next(iter(p0.values())).device
    saved: dict[int, tuple] = {}

    def linearised(i: int, batch) -> tuple:
        """(f, vjp closure, u ↦ ∇²_f loss · u) of one batch at θ."""
        if i in saved:
            return saved[i]
        batch = _floats_to(batch, work)
        f = lambda p: functional_call(wrapped, p, (batch,))  # noqa: E731
        out, vjp_fn = vjp(f, p0)
        if head is not None:
            hess = pulled_back_hessian(task.output_hessian_product(head(out), batch),
                                       head.weight.detach(), out.shape[:-1])  # fmt: skip
        elif closed_form:
            hess = task.output_hessian_product(out, batch)
        else:
            dloss = grad(lambda o: task.loss_from_output(o, batch).sum())
            hess = vmap(lambda u: jvp(dloss, (out,), (u,))[1])  # noqa: E731
        if cache:
            saved[i] = (f, vjp_fn, hess)
        return f, vjp_fn, hess

    def matvec(v: Tensor) -> Tensor:
        vs = v.reshape(-1, v.shape[-1])
        tangents = _to_params(vs.to(dev, work), mods)
        total = torch.zeros(vs.shape, dtype=work, device=dev)
        # no_grad: the untracked parameters (embeddings, norms) still require grad, and the
        # torch.func transforms below ignore an outer no_grad, so G v carries no autograd graph
        with _math_sdpa(), torch.no_grad():
            for i, batch in enumerate(batches):
                f, vjp_fn, hess = linearised(i, batch)
                jv = vmap(lambda t, f=f: jvp(f, (p0,), (t,))[1])(tangents)  # J v, (K, *out)
                # H (J v) on all K at once (every `hess` takes a leading K), then Jᵀ
                total += _to_flat(vmap(vjp_fn)(hess(jv))[0], mods)
        return (total * scale).to(v.device, v.dtype).reshape(v.shape)

    matvec.through_head = head is not None
    return matvec


PULLED_BACK_MAX_MB = 2048.0  # the cached H̃ of all batches (B·T·d² floats) the auto path allows
PULLED_BACK_MAX_HIDDEN = 512  # larger d: building H̃ (B·T·V·d²) outweighs what a solve saves


def pulled_back_hessian(hess: Matvec, weight: Tensor, positions: torch.Size) -> Matvec:
    """u ↦ H̃ u with H̃_t = Wᵀ H_t W (d × d at each position t), for logits = W h + b.

    The chain rule through a linear layer: Jᵀ H J with J = W Jₕ is Jₕᵀ (Wᵀ H W) Jₕ. For K
    right-hand sides at once, two ways: the sandwich Wᵀ H (W u) (K·B·T·4Vd multiply-adds and
    V-sized intermediates), or H̃ itself, built once from `hess` (u of shape positions × V)
    applied to the columns of W (B·T·V·d², a few columns at a time) and then read once per
    call (B·T·d² floats, shared by the K). Reading H̃ is memory-bound, so it pays from about
    K ≥ 20·d/V right-hand sides (measured in benchmarks/exact_speed.py); it is built at the
    first such call.
    """
    vocab, d = weight.shape
    k_min = math.ceil(20 * d / vocab)
    built: list[Tensor] = []

    def h_tilde() -> Tensor:
        if not built:
            cols = max(1, int(2**23 // max(1, positions.numel() * vocab)))  # ~32 MB at once
            blocks = []
            for lo in range(0, d, cols):
                w = weight[:, lo : lo + cols].T  # (c, V): columns of W as logits directions
                hw = hess(w.reshape(-1, *[1] * len(positions), vocab).expand(-1, *positions,
                                                                               vocab))
                blocks.append(hw @ weight)  # (c, *positions, d): rows of Wᵀ H_t W
            built.append(torch.cat(blocks).movedim(0, -1))  # (*positions, d, d), symmetric
        return built[0]

    def product(u: Tensor) -> Tensor:  # u (*lead, *positions, d)
        lead = u.shape[: u.dim() - len(positions) - 1]
        if math.prod(lead) < k_min:
            return hess(u @ weight.T) @ weight
        flat = u.reshape(-1, positions.numel(), d).transpose(0, 1)  # (positions, K, d)
        out = torch.bmm(flat, h_tilde().reshape(-1, d, d))  # u H̃ = (H̃ u)ᵀ, H̃ symmetric
        return out.transpose(0, 1).reshape(*lead, *positions, d)

    return product


def _through_head(model: nn.Module, task: Task, batches: list, mods: Sequence[TrackedModule],
                  want: bool | None, possible: bool,
                  owned: bool) -> tuple[nn.Module, nn.Linear | None]:  # fmt: skip
    """(the model to linearise, its untracked linear output layer) for
    `ggn_matvec(through_head=...)`: a model whose output layer is nn.Identity (`model` itself
    if it is already a private copy) and the layer, after checking on the first batch that
    the logits are exactly that layer applied to the new output; else (model, None)."""
    if want is False:
        return model, None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    tracked = {id(p) for m in mods for _, p in m.parameters()}
    reason = None
    if not possible:
        reason = "it needs cache=True and a task with a closed-form output_hessian_product"
    elif not isinstance(head, nn.Linear) or not hasattr(model, "set_output_embeddings"):
        reason = "the model has no linear output layer (get_output_embeddings)"
    elif any(id(p) in tracked for p in head.parameters()):
        reason = "the output layer is tracked (its weights are in G)"
    if reason is None and want is None:  # auto: only where it is cheaper and fits
        if not all(hasattr(b, "input_ids") for b in batches):
            return model, None
        positions, d = sum(b.input_ids.numel() for b in batches), head.in_features
        mb = positions * d**2 * head.weight.element_size() / 2**20
        if d >= head.out_features or d > PULLED_BACK_MAX_HIDDEN or mb > PULLED_BACK_MAX_MB:
            return model, None
    if reason is None:
        with torch.no_grad(), _math_sdpa():
            b0 = _floats_to(batches[0], head.weight.dtype)
            ref = task.output(model, b0)
            body = model if owned else copy.deepcopy(model)
            head = body.get_output_embeddings()
            body.set_output_embeddings(nn.Identity())
            h = task.output(body, b0)
            same = h.shape[-1] == head.in_features and torch.allclose(
                head(h), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        if same:
            return body, head
        body.set_output_embeddings(head)
        reason = "the model's logits are not its output layer applied to the hidden state"
    if want:
        raise ValueError(f"through_head=True is not possible here: {reason}; use "
                         "through_head=None or False (the logits path, the same G)")  # fmt: skip
    return model, None


def _floats_to(batch, dtype: torch.dtype):
    """A (x, y) batch with its floating-point inputs in `dtype` (token batches pass as they are)."""
    if isinstance(batch, (tuple, list)):
        return type(batch)(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                           for t in batch)  # fmt: skip
    return batch


def modules_of(model: nn.Module, modules: Sequence[TrackedModule]) -> list[TrackedModule]:
    """The same tracked layers (by name) inside `model`, e.g. a dtype-converted copy."""
    named = dict(model.named_modules())
    if all(m.module is named.get(m.name) for m in modules):
        return list(modules)
    missing = [m.name for m in modules if m.name not in named]
    if missing:
        raise ValueError(f"layers {missing} are not in the model; pass that model's modules")
    return [replace(m, module=named[m.name]) for m in modules]


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


def block_diagonal_ggn_matvec(model: nn.Module, task: Task, batches,
                              modules: Sequence[TrackedModule], **kw) -> Matvec:
    """v ↦ diag(G_11, …, G_LL) v, each block G_ll = (1/N) Σ_n J_{n,l}ᵀ H_n J_{n,l} by its own
    `ggn_matvec` over layer l alone (kw: its dtype, cache, through_head, ...).

    The same matrix as `block_diagonal(ggn_matvec(...), modules)`, cheaper: a layer's J·v
    starts at that layer and its Jᵀ·u stops there, and no other layer's weight gradients
    are formed. Costs L linearisations (with cache=True, L layers' activations).
    """
    per_layer = [ggn_matvec(model, task, batches, [m], **kw) for m in modules]
    sizes = [m.numel for m in modules]

    def block_matvec(v: Tensor) -> Tensor:
        return torch.cat([mv(part) for mv, part in zip(per_layer, v.split(sizes, dim=-1))],
                         dim=-1)  # fmt: skip

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
    """(G + λI)⁻¹ v by (preconditioned) conjugate gradient, batched over queries (Notebook 04
    §Iterative solvers).

    The recurrences run in b's dtype (float64 for a ground truth) whatever precision
    `matvec` computes its products in. Optional:
    - preconditioner: z = M r with M ≈ (G+λI)⁻¹ symmetric positive definite (e.g. EK-FAC):
      the same exact solution in fewer iterations;
    - check_matvec: an exact (e.g. float64) G·v for the true residual at the end and for
      `refine` rounds of iterative refinement, x ← x + CG((G+λI) d = b − (G+λI)x), which
      remove the error of low-precision products;
    - snapshots: iteration counts k at which x_k is kept in `snapshot_solutions[k]` (CG with a
      budget of k iterations, from the first round of the same run; no preconditioner);
    - time_limit_s: stop iterating (and refining) after this many seconds of `solve`; the
      queries not converged by then are reported as such (`stopped_by_time` is True), and
      `late_solution` keeps x at 3/4 of the limit (how settled x is).
    After `apply`, `iterations` (K,) (all rounds), `round_residuals` (the true residuals
    before each refinement round) and `round_solutions` (x before each round that ran),
    `residuals` (K,) = ‖b − (G+λI)x‖/‖b‖
    (recomputed with check_matvec or matvec, not the recursive estimate) and `converged` (K,)
    describe each query's solve.
    """

    name = "cg"

    def __init__(self, matvec: Matvec | Tensor, modules, damping: float, max_iter: int = 500,
                 tol: float = 1e-10, progress: bool = False, *,
                 preconditioner: Matvec | None = None, check_matvec: Matvec | None = None,
                 refine: int = 0, snapshots: Sequence[int] = (),
                 time_limit_s: float | None = None):  # fmt: skip
        super().__init__(modules)
        self.time_limit_s = time_limit_s
        self.matvec, self.damping = _as_matvec(matvec), _check_damping(damping)
        self.max_iter, self.tol, self.progress = max_iter, tol, progress
        self.precond, self.refine = preconditioner, int(refine)
        self.check = _as_matvec(check_matvec) if check_matvec is not None else None
        self.snapshots = sorted(set(int(k) for k in snapshots))
        if self.snapshots and preconditioner is not None:
            raise ValueError("snapshots are plain CG iterates: use them without a "
                             "preconditioner")  # fmt: skip
        if self.refine < 0 or (self.refine and check_matvec is None):
            raise ValueError("refine needs check_matvec (the exact products) and must be >= 0")

    def _A(self, x: Tensor, matvec: Matvec | None = None) -> Tensor:
        y = (matvec or self.matvec)(x) + self.damping * x
        _check_vec(y, "(G+λI)v products")
        return y

    def _M(self, r: Tensor) -> Tensor:
        return r if self.precond is None else self.precond(r).to(r.dtype)

    def _cg(self, b: Tensor, tol: Tensor, record: bool = False) -> tuple[Tensor, Tensor]:
        """x ≈ (G+λI)⁻¹ b, stopping each row when ‖r‖ ≤ tol·‖b‖ (tol per row); record: keep
        the snapshots."""
        bnorm = b.norm(dim=1)
        x, r = torch.zeros_like(b), b.clone()
        z = self._M(r)
        p, rz = z.clone(), (r * z).sum(1)
        active = bnorm > 0
        ray_max = torch.zeros(b.shape[0], dtype=b.dtype, device=b.device)
        bar = tqdm(range(self.max_iter), desc="CG", disable=not self.progress, leave=False)
        for it in bar:
            if not active.any():
                break
            if self._out_of_time():
                self.stopped_by_time = True
                break
            if (record and self.late_solution is None and self.time_limit_s is not None
                    and time.monotonic() - self._t0 > 0.75 * self.time_limit_s):  # fmt: skip
                self.late_solution, self.late_iteration = x.clone(), it
            ap = self._A(p)
            pap, pp = (p * ap).sum(1), (p * p).sum(1)
            ray = pap / pp.clamp_min(1e-300)
            ray_max = torch.maximum(ray_max, torch.where(active, ray, 0))
            if (active & (ray <= 10 * torch.finfo(b.dtype).eps * ray_max)).any():
                raise ValueError("G+λI is singular: set damping > 0 (CG met a direction "
                                 "with pᵀ(G+λI)p ≈ 0)")  # fmt: skip
            alpha = torch.where(active, rz / pap, 0)
            x += alpha[:, None] * p
            r -= alpha[:, None] * ap
            self.iterations += active.long()
            if record and it + 1 in self.snapshots:
                self.snapshot_solutions[it + 1] = x.clone()
            rel = r.norm(dim=1) / bnorm.clamp_min(1e-300)
            active = active & (rel > tol)
            if self.progress and it % 10 == 0:
                bar.set_postfix(worst_residual=f"{float(rel.max()):.1e}", refresh=False)
            z = self._M(r)
            rz_new = (r * z).sum(1)
            p = z + torch.where(active, rz_new / rz.clamp_min(1e-300), 0)[:, None] * p
            rz = rz_new
        return x, active

    def _out_of_time(self) -> bool:
        return self.time_limit_s is not None and time.monotonic() - self._t0 > self.time_limit_s

    def solve(self, b: Tensor) -> Tensor:
        self._t0, self.stopped_by_time = time.monotonic(), False
        self.late_solution: Tensor | None = None  # x at 3/4 of time_limit_s (first round)
        self.late_iteration = 0
        bnorm = b.norm(dim=1).clamp_min(1e-300)
        self.iterations = torch.zeros(b.shape[0], dtype=torch.long, device=b.device)
        self.snapshot_solutions: dict[int, Tensor] = {}
        x, active = self._cg(b, torch.full_like(bnorm, self.tol), record=True)
        for k in self.snapshots:  # a query that converged before k keeps its final x
            self.snapshot_solutions.setdefault(k, x.clone())
        self.round_residuals: list[list[float]] = []  # true residual before each refinement
        self.round_solutions: list[Tensor] = []  # x before each refinement round
        for _ in range(self.refine):
            r = b - self._A(x, self.check)
            rel = r.norm(dim=1) / bnorm
            self.round_residuals.append(rel.tolist())
            if (rel <= self.tol).all() or self._out_of_time():
                break
            self.round_solutions.append(x.clone())
            # the correction only has to bring the residual to tol·‖b‖, i.e. tol·‖b‖/‖r‖ of ‖r‖
            d, active = self._cg(r, (self.tol / rel.clamp_min(1e-300)).clamp(max=1.0))
            x = x + d
        self.residuals = (b - self._A(x, self.check)).norm(dim=1) / bnorm
        self.converged = self.residuals <= self.tol if self.refine else ~active
        if not self.converged.all():
            warnings.warn(
                f"CG: {int((~self.converged).sum())} of {b.shape[0]} queries did not reach "
                f"tol={self.tol} in max_iter={self.max_iter} (worst relative residual "
                f"{self.residuals.max().item():.2e}); raise max_iter or damping.",
                stacklevel=2,
            )
        return x


class LissaIHVP(_FlatIHVP):
    """LiSSA: v_{j+1} = v + (I − (G+λI)/scale) v_j, v_0 = v; returns v_J / scale.

    Converges when scale > λ_max(G+λI)/2 (Notebook 04 §Iterative solvers); the truncation
    error after J steps decays like (1 − (λ_min+λ)/scale)^J. After `apply`,
    `increments` (K,) = ‖v_J − v_{J−1}‖/‖v_J‖ says how settled each query is, and
    `snapshot_solutions[j]` holds v_j / scale for each j in `snapshots` (depth-j LiSSA from
    the same run).
    """

    name = "lissa"

    def __init__(self, matvec: Matvec | Tensor, modules, damping: float, depth: int = 1000,
                 scale: float = 10.0, progress: bool = False,
                 snapshots: Sequence[int] = ()):  # fmt: skip
        super().__init__(modules)
        self.matvec, self.damping = _as_matvec(matvec), _check_damping(damping)
        if not scale > 0:
            raise ValueError(f"LiSSA scale must be > 0, got {scale!r}")
        self.depth, self.scale, self.progress = depth, float(scale), progress
        self.snapshots = {int(k) for k in snapshots}
        if any(not 0 < k <= depth for k in self.snapshots):
            raise ValueError(f"LiSSA snapshots must lie in 1..depth={depth}, got {snapshots}")

    def solve(self, b: Tensor) -> Tensor:
        cur, d0, prev = b.clone(), None, None
        self.snapshot_solutions: dict[int, Tensor] = {}
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
            if j + 1 in self.snapshots:
                self.snapshot_solutions[j + 1] = cur / self.scale
        self.increments = prev / cur.norm(dim=1).clamp_min(1e-300) if prev is not None else None
        return cur / self.scale


class PrecomputedIHVP(_FlatIHVP):
    """Solutions x = (G+λI)⁻¹ b computed beforehand for a fixed set of right-hand sides (e.g.
    a solver's snapshot after k iterations), served through the IHVP protocol."""

    name = "precomputed"

    def __init__(self, x: Tensor, modules: Sequence[TrackedModule]):
        super().__init__(modules)
        self.x = x

    def solve(self, b: Tensor) -> Tensor:
        if b.shape != self.x.shape:
            raise ValueError(f"precomputed solutions have shape {tuple(self.x.shape)}, got "
                             f"right-hand sides {tuple(b.shape)}: solve these queries instead")
        return self.x


def influence_exact(model, task: Task, queries, candidates, modules, G: Tensor,
                    damping: float) -> Tensor:  # fmt: skip
    """(Q, N) scores I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z), fully dense (Notebook 01)."""
    qg = per_example_flat_grads(model, task, queries, modules, measurement=True)
    cg = per_example_flat_grads(model, task, candidates, modules)
    return DenseSolveIHVP(G, modules, damping).solve(qg) @ cg.T


# ----------------------------------------------------------------------------- retraining

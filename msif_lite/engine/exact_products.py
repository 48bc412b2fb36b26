"""Exact curvature-vector products over the tracked layers (tiny models only): the GGN G v
(optionally through the untracked output layer), the Hessian H v, and their block-diagonal
parts, for v of shape (P,) or (K, P) in the flat layout of `engine.layers.flatten`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from msif_lite.engine.functional import (
    Matvec,
    OutputOf,
    _as_list,
    _check_eval,
    _floats_to,
    _n_examples,
    math_sdpa,
    modules_of,
    to_flat,
    to_params,
    tracked_params,
)
from msif_lite.engine.layers import TrackedModule
from msif_lite.engine.tasks import Task


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
    wrapped = OutputOf(model, task)
    p0 = tracked_params(mods)
    scale = 1.0 / _n_examples(task, batches) if average else 1.0
    work, dev = next(iter(p0.values())).dtype, next(iter(p0.values())).device
    saved: dict[int, tuple] = {}

    def linearised(i: int, batch) -> tuple:
        if i in saved:
            return saved[i]
        lin = _linearise(wrapped, task, _floats_to(batch, work), p0, head, closed_form)
        if cache:
            saved[i] = lin
        return lin

    def matvec(v: Tensor) -> Tensor:
        vs = v.reshape(-1, v.shape[-1])
        tangents = to_params(vs.to(dev, work), mods)
        total = torch.zeros(vs.shape, dtype=work, device=dev)
        # no_grad: the untracked parameters (embeddings, norms) still require grad, and the
        # torch.func transforms below ignore an outer no_grad, so G v carries no autograd graph
        with math_sdpa(), torch.no_grad():
            for i, batch in enumerate(batches):
                f, vjp_fn, hess = linearised(i, batch)
                jv = vmap(lambda t, f=f: jvp(f, (p0,), (t,))[1])(tangents)  # J v, (K, *out)
                # H (J v) on all K at once (every `hess` takes a leading K), then Jᵀ
                total += to_flat(vmap(vjp_fn)(hess(jv))[0], mods)
        return (total * scale).to(v.device, v.dtype).reshape(v.shape)

    matvec.through_head = head is not None
    return matvec



def _linearise(wrapped: OutputOf, task: Task, batch, p0: dict[str, Tensor],
               head: nn.Linear | None, closed_form: bool) -> tuple:  # fmt: skip
    """(f, vjp closure, u ↦ ∇²_f loss · u) of one batch at θ = p0, for `ggn_matvec`: the
    output Hessian pulled back through `head`, in closed form, or by jvp-of-grad."""
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
    return f, vjp_fn, hess


PULLED_BACK_MAX_MB = 2048.0  # the cached H̃ of all batches (B·T·d² floats) the auto path allows
PULLED_BACK_MAX_HIDDEN = 512  # larger d: building H̃ (B·T·V·d²) outweighs what a solve saves


def pulled_back_hessian(hess: Matvec, weight: Tensor, positions: torch.Size) -> Matvec:
    """u ↦ H̃ u with H̃_t = Wᵀ H_t W (d × d at each position t), for logits = W h + b.

    The chain rule through a linear layer: Jᵀ H J with J = W Jₕ is Jₕᵀ (Wᵀ H W) Jₕ. For K
    right-hand sides at once, two ways: the sandwich Wᵀ H (W u) (K·B·T·4Vd multiply-adds and
    V-sized intermediates), or H̃ itself, built once from `hess` (u of shape positions × V)
    applied to the columns of W (B·T·V·d², a few columns at a time) and then read once per
    call (B·T·d² floats, shared by the K). Reading H̃ is memory-bound, so it pays from about
    K ≥ 20·d/V right-hand sides (measured by `msif-lite bench exact-speed`); it is built at the
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
        with torch.no_grad(), math_sdpa():
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


def hessian_matvec(
    model: nn.Module, task: Task, batches, modules: Sequence[TrackedModule]
) -> Matvec:
    """v ↦ H v, H = ∇²_θ (1/N) Σ_n ℓ_n over the tracked layers (forward-over-reverse)."""
    _check_eval(model)
    wrapped, batches = OutputOf(model, task), _as_list(batches)
    p0, n = tracked_params(modules), _n_examples(task, batches)

    def matvec(v: Tensor) -> Tensor:
        vs = v.reshape(-1, v.shape[-1])
        tangents = to_params(vs.to(next(iter(p0.values())).dtype), modules)
        total = torch.zeros_like(vs)
        with math_sdpa(), torch.no_grad():  # as in ggn_matvec: no graph through the result
            for b in batches:
                loss = lambda p, b=b: task.loss_from_output(functional_call(wrapped, p, (b,)), b)  # noqa: E731
                g = grad(lambda p, loss=loss: loss(p).sum())
                total += to_flat(vmap(lambda t, g=g: jvp(g, (p0,), (t,))[1])(tangents), modules)
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

"""Influence scores: I(z, q) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(z)   (positive = z helps q; dm/dε = −I).

Notebook 06 §Scoring documents: precondition the Q query gradients once, P = (G + λI)⁻¹∇m,
then stream candidate batches: each batch costs one forward pass, one backward pass to the
layer outputs and one einsum per layer to form DW_n, and only one batch of candidate
gradients is held at a time. Notebook 06 §Which tokens carry the score? splits a score over the
candidate's token positions: I_t = Σ_l Ds_tᵀ P_l ā_t, which sums over t to I.

Layer by layer (Notebook 09 §Low-rank query gradients): the kit's curvatures are
block-diagonal over the tracked layers, P_l = (G_l + λ_l I)⁻¹ ∇m_l (multi-stage: both stages
of layer l, c·(H_pt,l + λ_pt I)⁻¹ (H_ft,l + αI)⁻¹ ∇m_l), so `precondition` and
`preconditioned_queries` precondition one layer at a time (`layer_inverse`); a rank-r query
is truncated right after its layer is preconditioned, so neither the dense query gradients
nor the dense preconditioned gradients of all layers are ever held together.
`preconditioned_queries` is the one place this loop lives: `pairwise_scores` and
`Attributor.scores` (through `GradientMethod.preconditioned`) both use it. An inverse that
is not block-diagonal (the dense references of `engine.exact`) is applied whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Sized

import torch
from torch import nn
from tqdm.auto import tqdm

from msif_lite.engine.capture import BatchCapture, capture_batch, per_sequence_grads
from msif_lite.engine.ihvp import InverseHVP
from msif_lite.engine.layers import Grads, TrackedModule, check_finite
from msif_lite.engine.multistage import MultiStageIHVP
from msif_lite.engine.tasks import Task


def _split(batch, size: int) -> list:
    """Split one batch into chunks of at most `size` examples (TokenBatch or tuple of tensors)."""
    n = len(batch) if hasattr(batch, "select") else batch[0].shape[0]
    if n == 0:
        raise ValueError("got an empty batch of queries; pass at least one query.")
    out = []
    for i in range(0, n, size):
        s = slice(i, i + size)
        out.append(batch.select(s) if hasattr(batch, "select") else tuple(t[s] for t in batch))
    return out


def query_gradients(
    model: nn.Module,
    task: Task,
    queries,
    modules: Sequence[TrackedModule],
    batch_size: int = 16,
) -> Grads:
    """∇_θ m(q) per query, (Q, out, d_in) per layer (m = task.measurement, e.g. −log p(answer))."""
    parts = [
        per_sequence_grads(model, task, b, modules, measurement=True)
        for b in _split(queries, batch_size)
    ]
    return {m.name: torch.cat([p[m.name] for p in parts]) for m in modules}


def layer_inverse(ihvp: InverseHVP, name: str) -> InverseHVP | None:
    """The block (G_l + λ_l I)⁻¹ of layer `name` of a block-diagonal inverse, as an InverseHVP
    of that one layer (the same λ_l: the damping heuristic is per layer): an inverse is
    block-diagonal when it has a `layer(name)` method (EK-FAC, K-FAC, the identity, every
    registered curvature that declares it) or composes two such (multi-stage); None otherwise
    (then it must be applied to all layers at once)."""
    if isinstance(ihvp, MultiStageIHVP):
        ft, pt = layer_inverse(ihvp.finetune, name), layer_inverse(ihvp.pretrain, name)
        if ft is None or pt is None:
            return None
        return MultiStageIHVP(ft, pt, ihvp.alpha, ihvp.include_alpha)
    layer = getattr(ihvp, "layer", None)
    return None if layer is None else layer(name)


def _blocks(ihvp: InverseHVP, names: Sequence[str]) -> dict[str, InverseHVP] | None:
    blocks = {n: layer_inverse(ihvp, n) for n in names}
    return None if any(b is None for b in blocks.values()) else blocks  # type: ignore[return-value]


def precondition(query_grads: Grads, ihvp: InverseHVP, *, layerwise: bool = True) -> Grads:
    """P = (G + λI)⁻¹ ∇m, once per query (Notebook 06 §Scoring documents). `layerwise`: one
    layer at a time when the inverse is block-diagonal (`layer_inverse`), so only one layer's
    intermediates exist at once; the result is the same."""
    check_finite(query_grads, "query gradients")
    blocks = _blocks(ihvp, list(query_grads)) if layerwise else None
    if blocks is None:
        out = ihvp.apply(query_grads)
    else:
        out = {k: blocks[k].apply({k: v})[k] for k, v in query_grads.items()}
    check_finite(out, f"preconditioned query gradients ({ihvp.name})")
    return out


def _query_captures(model, task, queries, modules, batch_size: int) -> list[BatchCapture]:
    return [capture_batch(model, task, b, modules, measurement=True)
            for b in _split(queries, batch_size)]  # fmt: skip


def preconditioned_queries(
    model: nn.Module,
    task: Task,
    queries,
    modules: Sequence[TrackedModule],
    ihvp: InverseHVP,
    *,
    rank: int | None = None,
    batch_size: int = 16,
    layerwise: bool = True,
    on_gradient: Callable[[str, torch.Tensor], None] | None = None,
    progress: bool = False,
):
    """P_l = (G_l + λ_l I)⁻¹ ∇m_l for a query batch, layer by layer: the captured (ā, Ds) of
    all queries are kept (Q·T·(d_in + o) per layer), then each layer's ∇m_l = Σ_t Ds_t ā_tᵀ is
    formed, preconditioned and (with `rank`) truncated to rank r before the next layer.
    Returns Grads, or `LowRankGrads` with `rank`. Peak: the kept result plus one layer's
    (Q, o, d_in) temporaries (not the (1 + stages)·Q·P of `precondition` on all layers).
    `on_gradient(name, ∇m_l)` sees each layer's (Q, o, d_in) query gradient before it is
    preconditioned (e.g. to accumulate ‖∇m‖² without a second pass). `layerwise=False` (or
    an inverse that is not block-diagonal): the dense path, for comparison. `progress`: a
    bar over the layers (shown after 2 s)."""
    from msif_lite.engine.lowrank import LowRankGrads, truncate

    blocks = _blocks(ihvp, [m.name for m in modules]) if layerwise else None
    if blocks is None:
        qg = query_gradients(model, task, queries, modules, batch_size)
        for name, g in qg.items() if on_gradient is not None else ():
            on_gradient(name, g)
        pre = precondition(qg, ihvp, layerwise=False)
        del qg
        return pre if rank is None else truncate(pre, rank)
    caps = _query_captures(model, task, queries, modules, batch_size)
    dense: Grads = {}
    left: dict[str, torch.Tensor] = {}
    right: dict[str, torch.Tensor] = {}
    for m, g in tqdm(_layer_query_gradients(caps, modules), desc="preconditioning queries "
                     "(per layer)", total=len(modules), disable=not progress, delay=2.0):
        if on_gradient is not None:
            on_gradient(m.name, g)
        p = blocks[m.name].apply({m.name: g})[m.name]
        del g
        check_finite({m.name: p}, f"preconditioned query gradients ({ihvp.name})")
        if rank is None:
            dense[m.name] = p
        else:
            low = truncate({m.name: p}, rank)
            left[m.name], right[m.name] = low.left[m.name], low.right[m.name]
        del p
    return dense if rank is None else LowRankGrads(left, right, rank)


def query_gradient_norms(model: nn.Module, task: Task, queries,
                         modules: Sequence[TrackedModule], batch_size: int = 16) -> torch.Tensor:
    """‖∇m(q)‖ = sqrt(Σ_l ‖∇m_l‖_F²) over the tracked layers, (Q,) float64, one layer's
    (Q, o, d_in) gradient at a time (from the kept captures, like `preconditioned_queries`)."""
    caps = _query_captures(model, task, queries, modules, batch_size)
    return sum(grad_sq_norms(g) for _, g in _layer_query_gradients(caps, modules)).sqrt()


def _layer_query_gradients(caps, modules: Sequence[TrackedModule]):
    """(module, ∇m_l = Σ_t Ds_t ā_tᵀ of all queries, (Q, o, d_in)) one layer at a time, from
    the kept query captures; the previous layer's gradient is the caller's to drop."""
    for i, m in enumerate(modules):
        g = torch.cat([c.layers[i].per_sequence_grad() for c in caps])
        check_finite({m.name: g}, "query gradients")
        yield m, g


def grad_sq_norms(g: torch.Tensor) -> torch.Tensor:
    """‖g_q‖_F² per leading index of a (Q, o, d_in) layer gradient, float64."""
    return g.double().pow(2).sum((-2, -1))


def precondition_lowrank(query_grads: Grads, ihvp: InverseHVP, rank: int, *,
                         layerwise: bool = True):  # fmt: skip
    """Rank-r truncation of P = (G + λI)⁻¹ ∇m for given query gradients, layer by layer
    (each layer truncated as soon as it is preconditioned)."""
    from msif_lite.engine.lowrank import LowRankGrads, truncate

    blocks = _blocks(ihvp, list(query_grads)) if layerwise else None
    if blocks is None:
        return truncate(precondition(query_grads, ihvp, layerwise=False), rank)
    left, right = {}, {}
    for k, v in query_grads.items():
        low = truncate(precondition({k: v}, blocks[k], layerwise=False), rank)
        left[k], right[k] = low.left[k], low.right[k]
    return LowRankGrads(left, right, rank)


def pairwise_scores(
    model: nn.Module,
    task: Task,
    query_grads_or_batch,
    candidates: Iterable,
    ihvp: InverseHVP,
    modules: Sequence[TrackedModule],
    *,
    by_module: bool = False,
    progress: bool = True,
    preconditioned: bool = False,
    rank: int | None = None,
    layerwise: bool = True,
    total: int | None = None,
) -> torch.Tensor:
    """I[q, n] = Σ_l ⟨P_{q,l}, DW_{n,l}⟩ with P = (G + λI)⁻¹∇m(q): (Q, N), or (Q, N, L)
    per layer with `by_module` (layers in `modules` order; summing over L gives the total).

    `query_grads_or_batch`: a query batch, or query gradients ∇m (Grads); with
    `preconditioned=True`, Grads that are already P = precondition(∇m, ihvp), or a
    `LowRankGrads` (then scored at its rank).
    `rank`: score with the rank-r truncated SVD of each layer's P (msif_lite.engine.lowrank;
    Notebook 09), never forming the candidates' DW. Queries are preconditioned (and truncated)
    one layer at a time (`preconditioned_queries`); `layerwise=False` keeps the dense path.
    `total`: the number of candidate batches, for the progress bar when `candidates` is a
    generator (a sized `candidates` gives its own length)."""
    from msif_lite.engine.lowrank import LowRankGrads, pairwise_scores_lowrank, truncate

    if isinstance(query_grads_or_batch, LowRankGrads):
        if not preconditioned:
            raise ValueError("LowRankGrads are preconditioned queries: pass preconditioned=True")
        return pairwise_scores_lowrank(model, task, query_grads_or_batch, candidates, modules,
                                       progress=progress, by_module=by_module,
                                       total=total)  # fmt: skip
    given = isinstance(query_grads_or_batch, Mapping)
    if preconditioned:
        if not given:
            raise ValueError("preconditioned=True needs Grads from precondition(...), not a batch")
        pre = dict(query_grads_or_batch)
        check_finite(pre, "preconditioned query gradients")
        pre = pre if rank is None else truncate(pre, rank)
    elif given:
        pre = (precondition(dict(query_grads_or_batch), ihvp, layerwise=layerwise)
               if rank is None else precondition_lowrank(dict(query_grads_or_batch), ihvp, rank,
                                                         layerwise=layerwise))  # fmt: skip
    else:
        pre = preconditioned_queries(model, task, query_grads_or_batch, modules, ihvp, rank=rank,
                                     layerwise=layerwise)  # fmt: skip
    if rank is not None:
        return pairwise_scores_lowrank(model, task, pre, candidates, modules, progress=progress,
                                       by_module=by_module, total=total)  # fmt: skip
    cols = []
    total = len(candidates) if isinstance(candidates, Sized) else total
    for batch in tqdm(candidates, desc="pairwise scores", total=total, disable=not progress):
        dtype = pre[modules[0].name].dtype
        cap = capture_batch(model, task, batch, modules, dtype=dtype)
        per_layer = []
        for m, x in zip(modules, cap.layers):
            dw = x.per_sequence_grad().reshape(cap.n_sequences, -1)
            per_layer.append(pre[m.name].reshape(len(pre[m.name]), -1) @ dw.T)  # (Q, B)
        # NaN/inf in a candidate gradient reaches its scores: check (Q, B), not (B, P)
        check_finite(dict(zip([m.name for m in modules], per_layer)), "candidate scores")
        cols.append(torch.stack(per_layer, -1) if by_module else sum(per_layer))
    if not cols:
        raise ValueError(
            "the candidate set is empty: `candidates` yielded no batches. Pass an iterable of "
            "batches (e.g. a DataLoader or a list of TokenBatch) with at least one example."
        )
    return torch.cat(cols, dim=1)


def self_influence(
    model: nn.Module,
    task: Task,
    candidates: Iterable,
    ihvp: InverseHVP,
    modules: Sequence[TrackedModule],
    *,
    progress: bool = True,
) -> torch.Tensor:
    """I(z, z) = ∇ℓ(z)ᵀ (G + λI)⁻¹ ∇ℓ(z) per candidate, (N,) (Notebook 06 §Self-influence)."""
    out = []
    for batch in tqdm(candidates, desc="self-influence", disable=not progress):
        g = per_sequence_grads(model, task, batch, modules)
        p = ihvp.apply(g)
        out.append(sum((g[m.name] * p[m.name]).sum((-2, -1)) for m in modules))
    if not out:
        raise ValueError("the candidate set is empty: `candidates` yielded no batches.")
    return torch.cat(out)


def module_breakdown(
    scores_by_module: torch.Tensor, modules: Sequence[TrackedModule]
) -> dict[str, torch.Tensor]:
    """Sum (…, L) per-layer scores by layer group ('attention', 'mlp', 'other'); divide by
    the total (scores_by_module.sum(-1)) for each group's share. Groups with no layer are
    left out."""
    if scores_by_module.shape[-1] != len(modules):
        raise ValueError(
            f"scores have {scores_by_module.shape[-1]} layers, `modules` has {len(modules)}; "
            "pass the scores of pairwise_scores(..., by_module=True) and the same modules."
        )
    groups: dict[str, torch.Tensor] = {}
    for i, m in enumerate(modules):
        s = scores_by_module[..., i]
        groups[m.group] = groups[m.group] + s if m.group in groups else s.clone()
    return groups


def per_token_scores(
    model: nn.Module,
    task: Task,
    preconditioned_query_grads: Grads,
    candidate_batch,
    modules: Sequence[TrackedModule],
) -> torch.Tensor:
    """I[q, b, t] = Σ_l Ds_{b,t}ᵀ P_{q,l} ā_{b,t}: token t's share of I(z_b, q); (Q, B, T).
    Σ_t I[q, b, t] = pairwise score; padding positions are exactly 0 (Notebook 06
    §Per-token scores). Pass P = precondition(query_gradients(...), ihvp)."""
    pre = preconditioned_query_grads
    dtype = pre[modules[0].name].dtype
    cap = capture_batch(model, task, candidate_batch, modules, dtype=dtype)
    total = sum(x.token_scores(pre[m.name]) for m, x in zip(modules, cap.layers))
    check_finite({"per-token scores": total}, "scores")
    return total.masked_fill(~cap.mask, 0.0)

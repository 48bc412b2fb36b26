"""Token-factored candidate gradients: DW_l = Σ_t Ds_t ā_tᵀ = Dsᵀ ā, kept as (ā, Ds).

Notebook 03 §Per-layer blocks: a document of T real tokens has, per tracked layer, ā (T, d_in)
and Ds (T, out) (`engine.capture`), T·(o + d_in) numbers instead of the o·d_in of DW_l. It
is exact (no approximation), and smaller while T·Σ_l (o_l + d_l) < Σ_l o_l·d_l
(`prefers_tokens`; SmolLM2-135M's 90 MLP layers: T ≤ 418). What the gradient store needs is
computed from the factors without forming DW:

    ⟨P, DW⟩ = Σ_t Ds_tᵀ P ā_t,   rank r (P = L R): Σ_t (Lᵀ Ds_t)·(R ā_t)
    ‖DW‖_F² = Σ_{t,t'} (Ds Dsᵀ ⊙ ā āᵀ)_{t t'}

A document's factors are one dict `Doc`: "a:<layer>" → ā, "ds:<layer>" → Ds, padding cut
(capture zeroes it; `BatchCapture.mask` says which positions are real).
`GradientStore(storage="tokens" | "auto")` (engine.gradstore) stores them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from msif_lite.engine.capture import BatchCapture
from msif_lite.engine.layers import Grads, TrackedModule, check_finite
from msif_lite.engine.lowrank import LowRankGrads

Doc = dict[str, torch.Tensor]


def dense_numel(modules: Iterable[TrackedModule]) -> int:
    """Σ_l o_l·d_l: one document's dense gradient."""
    return sum(m.numel for m in modules)


def token_numel(n_tokens: int, modules: Iterable[TrackedModule]) -> int:
    """T·Σ_l (o_l + d_l): one document's factors (ā, Ds) on its T real tokens."""
    return n_tokens * sum(m.out_features + m.d_in for m in modules)


def prefers_tokens(n_tokens: int, modules: Sequence[TrackedModule]) -> bool:
    """Whether the factors are smaller than DW: T·Σ_l (o_l + d_l) < Σ_l o_l·d_l."""
    return token_numel(n_tokens, modules) < dense_numel(modules)


def chunks(sizes: Sequence[float], budget: float) -> Iterator[list[int]]:
    """Consecutive positions whose sizes sum to at most `budget` (at least one each)."""
    part: list[int] = []
    used = 0.0
    for i, s in enumerate(sizes):
        if part and used + s > budget:
            yield part
            part, used = [], 0.0
        part.append(i)
        used += s
    if part:
        yield part


def cut(capture: BatchCapture, rows: Sequence[int], dtype: torch.dtype) -> list[Doc]:
    """Each row's (ā, Ds) on its real tokens (`capture.mask`), as `dtype` on the CPU."""
    out = []
    for i in rows:
        keep = capture.mask[i].to(capture.layers[0].a.device)
        doc = {}
        for x in capture.layers:
            doc["a:" + x.name] = x.a[i][keep].detach().to(dtype).cpu().contiguous()
            doc["ds:" + x.name] = x.ds[i][keep].detach().to(dtype).cpu().contiguous()
        check_finite(doc, "candidate gradients (token factors)")
        out.append(doc)
    return out


def per_document(capture: BatchCapture, tokens: Sequence[bool],
                 dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:  # fmt: skip
    """Each row's stored tensors, as `dtype` on the CPU: its factors (`cut`) where `tokens`,
    else DW_l = Σ_t Ds_t ā_tᵀ per layer (formed for those rows only)."""
    rows = [i for i, t in enumerate(tokens) if t]
    out: list[dict[str, torch.Tensor]] = [{} for _ in tokens]
    for i, doc in zip(rows, cut(capture, rows, dtype)):
        out[i] = doc
    dense = [i for i, t in enumerate(tokens) if not t]
    for x in capture.layers if dense else ():
        dw = torch.bmm(x.ds[dense].transpose(1, 2), x.a[dense])
        check_finite({x.name: dw}, "candidate gradients")
        for j, i in enumerate(dense):
            out[i][x.name] = dw[j].detach().to(dtype).cpu()
    return out


def to_dense(doc: Doc, modules: Sequence[TrackedModule]) -> Grads:
    """DW_l = Dsᵀ ā per layer, (o, d_in): the dense gradient (formed: o·d_in per layer)."""
    return {m.name: doc["ds:" + m.name].T @ doc["a:" + m.name] for m in modules}


def sq_norm(doc: Doc, modules: Sequence[TrackedModule]) -> torch.Tensor:
    """‖DW‖_F² over the layers = Σ_l Σ_{t,t'} (Ds Dsᵀ ⊙ ā āᵀ)_{t t'}, float64 (T² per layer)."""
    total = torch.zeros((), dtype=torch.float64)
    for m in modules:
        a, ds = doc["a:" + m.name].double(), doc["ds:" + m.name].double()
        total += ((ds @ ds.T) * (a @ a.T)).sum()
    return total


def layer_scores(pre: Grads | LowRankGrads, m: TrackedModule, docs: Sequence[Doc],
                 max_bytes: float) -> torch.Tensor:  # fmt: skip
    """(Q, n) I[q, n] = Σ_{t ∈ n} Ds_tᵀ P_{q,l} ā_t of layer l for n documents' factors, on
    the queries' device in the factors' dtype; rank-r P = L R as (Lᵀ Ds_t)·(R ā_t) (P never
    formed). Tokens go through in slices whose (Q, tokens, ·) product is ≤ `max_bytes`."""
    a = torch.cat([d["a:" + m.name] for d in docs])
    ds = torch.cat([d["ds:" + m.name] for d in docs])
    lengths = torch.tensor([len(d["a:" + m.name]) for d in docs])
    doc_of = torch.repeat_interleave(torch.arange(len(docs)), lengths)
    low = isinstance(pre, LowRankGrads)
    q_mat = pre.left[m.name] if low else pre[m.name]
    dev, dt, q = q_mat.device, a.dtype, q_mat.shape[0]
    if low:
        left, right = pre.left[m.name].to(dt), pre.right[m.name].to(dt)
        width = 3 * left.shape[-1]
    else:
        p = q_mat.to(dt)
        width = min(p.shape[-2:])
    step = max(1, int(max_bytes // (q * width * a.element_size())))
    tok = []
    for s in range(0, len(a), step):
        at, dst = a[s : s + step].to(dev), ds[s : s + step].to(dev)
        if low:
            u = torch.einsum("to,qor->qtr", dst, left)
            tok.append((u * torch.einsum("ti,qri->qtr", at, right)).sum(-1))
        elif p.shape[-2] <= p.shape[-1]:  # (Q, t, o) is the smaller product
            tok.append(torch.einsum("qto,to->qt", torch.einsum("ti,qoi->qto", at, p), dst))
        else:
            tok.append(torch.einsum("qti,ti->qt", torch.einsum("to,qoi->qti", dst, p), at))
    tok_all = torch.cat(tok, 1) if tok else torch.zeros((q, 0), dtype=dt, device=dev)
    out = torch.zeros((q, len(docs)), dtype=tok_all.dtype, device=dev)
    return out.index_add_(1, doc_of.to(dev), tok_all)

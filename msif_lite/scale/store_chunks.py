"""The gradient store's side of the memory plan (`scale.memory`, "cached scoring"): which form
each candidate is stored in, and the peak of a stored chunk, dense or token-factored.

Notation as in `scale.memory`: layers m with inputs d_in and outputs o, P = Σ_m o·d_in, g
bytes per gradient element, Q queries, rank r, B_i × T_i batches with `tokens` real tokens.
A document of T tokens is stored token-factored (`engine.tokengrads`: ā and Ds on its real
tokens, T·Σ_m(o + d_in)·g bytes) with gradient_storage "tokens", or "auto" when
T·Σ_m(o + d_in) < P; else dense (P·g), or projected with a projection (storage ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from msif_lite.engine.tokengrads import chunks
from msif_lite.scale.options import batch_shapes

if TYPE_CHECKING:
    from msif_lite.scale.memory import _Sizes


def token_form(c: _Sizes) -> list[bool]:
    """Per candidate (`candidate_lengths`, in order), whether it is stored token-factored."""
    o, P = c.o, sum(d * out for _, d, out in c.s.layers)
    per_tok = sum(d + out for _, d, out in c.s.layers)
    if o.projection or o.gradient_storage == "dense":
        return [False] * len(o.candidate_lengths())
    return [o.gradient_storage == "tokens" or n * per_tok < P for n in o.candidate_lengths()]


def stored_bytes(c: _Sizes, per_doc: int) -> int:
    """The candidates' stored bytes: T·Σ_m(o + d_in)·g each token-factored, else per_doc
    (P'·g, dense or projected)."""
    per_tok = sum(d + out for _, d, out in c.s.layers) * c.g_e
    return sum(n * per_tok if t else per_doc
               for n, t in zip(c.o.candidate_lengths(), token_form(c)))  # fmt: skip


def stored_chunk(c: _Sizes, n: int, per_doc: int, P: int) -> int:
    """The largest stored chunk: of the dense (or projected) documents (`dense_chunk`) or of
    the token-factored ones (`token_chunk`), which the store scores apart."""
    tok = token_form(c)
    lengths = c.o.candidate_lengths()
    dense = [x for x, t in zip(lengths, tok) if not t]
    return max(dense_chunk(c, n, per_doc, P, dense) if dense else 0,
               token_chunk(c, [x for x, t in zip(lengths, tok) if t]))


def dense_chunk(c: _Sizes, n: int, per_doc: int, P: int, lengths: Sequence[int]) -> int:
    """`GradientStore.grads` on chunks of n dense (or projected) documents, each cut into
    batches in order: before batch i of a chunk, the documents written so far (the chunk's
    output is allocated empty, so only written pages are resident) + batch i's + act_i + its
    DW of all layers, B_i·P·g; or a stored chunk loaded, one file at a time: (n + 1)·P'·g."""
    best = (n + 1) * per_doc
    for start in range(0, len(lengths), n):
        written = 0
        for x in batch_shapes(lengths[start : start + n], c.o.batch_size):
            written += x.b
            best = max(best, written * per_doc + c.act(x, c.s.layers, False) + x.b * P * c.g_e)
    return best


def token_chunk(c: _Sizes, lengths: Sequence[int]) -> int:
    """Token-factored documents: chunks of ≤ chunk_mb of factors (`engine.tokengrads.chunks`),
    computed batch by batch (the chunk so far + act_i + the batch's factors cut,
    tokens_i·Σ_m(o + d_in)·g), then scored one layer at a time: the chunk + that layer's
    T_c tokens concatenated, T_c·(o + d_in)·g, + the query-token product Q·t·w·g over slices
    of t tokens with Q·t·w·g ≤ chunk_mb (w = min(o, d_in), or 3r with rank r)."""
    L, g, Q, r = c.s.layers, c.g_e, c.o.n_queries, c.o.query_rank
    per_tok, budget, best = sum(d + out for _, d, out in L) * g, c.o.chunk_mb * 2**20, 0
    for pos in chunks([n * per_tok for n in lengths], budget):
        part, held = [lengths[i] for i in pos], 0
        for x in batch_shapes(part, c.o.batch_size):
            best = max(best, held + c.act(x, L, False) + x.tokens * per_tok)
            held += x.tokens * per_tok
        t = sum(part)
        for _, d, out in L:
            w = 3 * min(r, d, out) if r else min(d, out)
            step = min(t, max(1, int(budget // (Q * w * g))))
            best = max(best, held + t * (d + out) * g + Q * step * w * g)
    return best

"""The scoring peak of `Attributor.scores`: predicted vs measured, at reduced BLOOM shapes on the
CPU (issue 16).

`msif-lite bench scoring-peak [--sizes small,large] [--candidates stored,streamed]
[--ranks full,8]`: each row runs in a fresh subprocess (`common.run_row`: one thread,
MALLOC_MMAP_THRESHOLD_=65536, so allocations of 64 KiB and more are mmapped and returned when
freed and resident memory follows the live bytes; with glibc's default dynamic threshold freed
heap is kept and RSS runs 30-60 % above the live bytes, see results/memory_plan.md). A row
builds a random-init BLOOM of the size, an Attributor on documents of exactly `seq_len` tokens
and `n_queries` questions of one token count, fits both stages' factors (MLP layers only, as
the BLOOM-560m target), warms up on other questions and documents, then measures
`Attributor.scores("multi_stage", …, query_rank=r)` (queries preconditioned layer by layer)
with `memory.measure_rss_peak` (VmHWM − VmRSS, high-water mark reset, free heap returned
first) plus the factors it holds (what `MemoryPlan.peak["cached scoring"]` counts).
Candidates are stored (under the disk budget: their gradients are computed and written during
the call, `CHUNK_DOCS` documents per chunk) or streamed (a budget of 0). Writes
results/scoring_peak.json and .md, with the BLOOM-560m shape predicted (16 queries × 1,000
candidates). `MSIF_FAST=1`: one tiny size.

The dense preconditioning path this replaced (every layer's ∇m, then P of every layer) is gone
from the library and from the plan; its numbers, measured by this benchmark before, are kept
in the markdown (`HISTORICAL`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from msif_lite.bench.common import (
    Benchmark,
    BenchResult,
    bloom560m_config,
    finish,
    markdown_table,
    run_row,
)
from msif_lite.config import fast_mode
from msif_lite.scale.memory import GiB, MemoryOptions, nbytes, predict

TARGET = 0.2  # |predicted / measured − 1|
RANK = 8
CHUNK_DOCS = 4  # stored gradients held at once (BLOOM-560m: 1 document per 1 GiB chunk)
METHOD = "multi_stage"
PHASE_FACTORS = "factors on device"
HISTORICAL = (
    "**Historical: the dense path.** Before issue 16 `Attributor.scores` preconditioned "
    "densely (every layer's ∇m, then P of every layer, then for rank 8 the truncation); this "
    "benchmark measured that path in the same run as the layer-by-layer one (its run "
    "before this file's: 16/16 rows within ±20 % including the dense ones, 1.03–1.04×). Dense, "
    "measured: small 0.420–0.422 GiB and large 1.675–1.676 GiB in every row (stored or "
    "streamed, full rank or rank 8). Layer by layer saved 23–25 % at full rank (small 0.324, "
    "large 1.262 GiB; the same scores, sums within 1e-4) and 48–50 % at rank 8 (small 0.218, "
    "large 0.832 GiB): 23–50 % measured. BLOOM-560m (MLP layers, 16 queries × 1,000 "
    "candidates, streamed) was planned at 36.1 GiB dense at every batch and rank, vs 33.8 / "
    "22.2 GiB (batch 4, full rank / rank 32) and 24.3 / 14.3 GiB (batch 1) layer by layer. "
    "The dense path (the memory planner's `layerwise=False`, `Attributor.rename`, "
    "`method.finish`) has since been removed, and with it the code that measured it.")


@dataclass(frozen=True)
class Size:
    """One reduced BLOOM and its workload."""

    name: str
    hidden: int
    n_layer: int
    vocab: int
    heads: int = 8
    batch_size: int = 4
    seq_len: int = 128  # tokens per document (eos included)
    n_queries: int = 16
    n_candidates: int = 24


SIZES = (Size("small", 256, 4, 8000), Size("large", 512, 4, 16000))
FAST_SIZES = (Size("tiny", 128, 2, 2000, heads=4, seq_len=48, n_queries=8, n_candidates=12),)
CANDIDATES = ("stored", "streamed")
RANKS = ("full", str(RANK))


def sizes() -> tuple[Size, ...]:
    """The sizes of this mode (`MSIF_FAST=1`: the tiny one)."""
    return FAST_SIZES if fast_mode() else SIZES


def bloom_config(size: Size):
    from transformers import BloomConfig

    return BloomConfig(vocab_size=size.vocab, hidden_size=size.hidden, n_layer=size.n_layer,
                       n_head=size.heads, attention_dropout=0.0, hidden_dropout=0.0)


def options(size: Size, query_len: int, rank: int | None, streamed: bool,
            chunk_mb: float) -> MemoryOptions:  # fmt: skip
    """The plan's options for one row (the query length as the row measured it)."""
    return MemoryOptions(include="mlp", batch_size=size.batch_size, seq_len=size.seq_len,
                         n_queries=size.n_queries, query_len=query_len, query_rank=rank,
                         n_candidates=size.n_candidates,
                         gradient_cache_gb=0.0 if streamed else 1e6,
                         chunk_mb=chunk_mb)  # fmt: skip


# ------------------------------------------------------------------ inputs of exact length
class Question(NamedTuple):
    prompt: str
    answer: str


def _single_token_words(tok, n: int = 400) -> list[str]:
    from msif_lite.world.generate import make_world

    words = []
    for text in make_world("ci-fast", seed=0).pretrain_texts():
        for w in text.split():
            if (w.isalpha() and w not in words and len(tok.encode(" " + w)) == 1
                    and len(tok.encode(w)) == 1):  # fmt: skip
                words.append(w)
    if len(words) < 20:
        raise RuntimeError("too few single-token words in the tokenizer's world")
    return words[:n]


def inputs(words: list[str], size: Size, seed: int) -> tuple[list[tuple[str, str]], list]:
    """Documents of seq_len − 1 single-token words (+ eos = seq_len tokens) and questions of
    a fixed word count (same token count for all), drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)

    def pick(k):
        return " ".join(words[i] for i in torch.randint(0, len(words), (k,), generator=g))

    docs = [(f"s{seed}d{i}", pick(size.seq_len - 1)) for i in range(size.n_candidates)]
    return docs, [Question(pick(12), pick(2)) for _ in range(size.n_queries)]


def tokenizer(out: Path):
    from transformers import AutoTokenizer

    from msif_lite.world.generate import make_world
    from msif_lite.world.lm import train_tokenizer

    if not (out / "tokenizer.json").exists():
        train_tokenizer(make_world("ci-fast", seed=0), out)
    return AutoTokenizer.from_pretrained(out)


# ------------------------------------------------------------------ one row, in a subprocess
def measure_row(spec: dict) -> dict:
    """Peak RSS growth of `Attributor.scores` (+ the factors it holds) for one row."""
    from transformers import BloomForCausalLM

    from msif_lite.attribution.attributor import AttributionConfig, Attributor
    from msif_lite.engine.factors import FactorConfig
    from msif_lite.scale.memory import measure_rss_peak

    torch.set_num_threads(1)
    size, rank = Size(**spec["size"]), spec["rank"]
    tok = tokenizer(Path(spec["tokenizer"]))
    torch.manual_seed(0)
    pt = BloomForCausalLM(bloom_config(size)).eval()
    ft = copy.deepcopy(pt)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    docs, qs = inputs(spec["words"], size, 1)
    warm_docs, warm_qs = inputs(spec["words"], size, 2)
    fit_docs, fit_pairs = inputs(spec["words"], size, 3)
    cfg = AttributionConfig(factors=FactorConfig(include="mlp", max_batches=2), progress=False,
                            batch_size=size.batch_size, cache_dir=spec["cache"],
                            context_length=max(512, size.seq_len + 1),
                            gradient_cache_gb=0.0 if spec["streamed"] else 1e6)  # fmt: skip
    att = Attributor(pt, ft, tok, docs + warm_docs + fit_docs, fit_pairs, cfg, alpha=0.01)
    held = nbytes(att.pretrain_factors) + nbytes(att.finetune_factors)
    store = att.store("pretrained")  # the GradientStore the method scores with
    store.chunk_bytes = CHUNK_DOCS * store.bytes_per_document()  # as at scale: a few per chunk
    ids, warm = [d for d, _ in docs], [d for d, _ in warm_docs[:2]]

    def fn(questions=qs, doc_ids=ids):
        return att.scores(METHOD, questions, doc_ids, query_rank=rank)

    fn(warm_qs[:2], warm)  # warm-up: kernels, lazily built state; other questions and documents
    peak, scores = measure_rss_peak(fn)
    return {"measured_bytes": peak + held, "held_bytes": held,
            "chunk_mb": store.chunk_bytes / 2**20,
            "doc_tokens": sorted({len(att.candidate(d).input_ids) for d in ids}),
            "query_tokens": sorted({len(att.qa_example(*q).input_ids) for q in qs}),
            "streams": store.streams(len(ids)), "scores_sum": float(scores.sum())}


# ------------------------------------------------------------------ the benchmark
def plan_row(size: Size, streamed: bool, rank: int | None, m: dict) -> dict:
    """A results row: the plan for what the subprocess measured (`m`), and their ratio."""
    if m["doc_tokens"] != [size.seq_len] or len(m["query_tokens"]) != 1:
        raise RuntimeError(f"inputs not of one length: {m['doc_tokens']}, {m['query_tokens']}")
    if m["streams"] != streamed:
        raise RuntimeError(f"the store streams={m['streams']}, expected {streamed}")
    o = options(size, m["query_tokens"][0], rank, streamed, m["chunk_mb"])
    plan = predict(bloom_config(size), o, device="cpu")
    pred, meas = plan.peak["cached scoring"], m["measured_bytes"]
    t = plan.terms["cached scoring"]
    return {"size": size.name, "candidates": "streamed" if streamed else "stored",
            "query_rank": rank, "predicted_gib": pred / GiB, "measured_gib": meas / GiB,
            "ratio": pred / meas if meas else float("nan"),
            "predicted_phase": max((k for k in t if k != PHASE_FACTORS), key=t.get),
            "held_gib": m["held_bytes"] / GiB, "scores_sum": m["scores_sum"]}  # fmt: skip


def bloom560m_prediction() -> list[dict]:
    """BLOOM-560m, MLP layers, 16 queries × 1,000 candidates (streamed: 806 GB of dense
    gradients is over the 20 GB budget), queries of 64 tokens, documents of 512, on a GPU."""
    cfg = bloom560m_config()
    out = []
    for b in (4, 1):
        for rank in (None, 32):
            o = MemoryOptions(include="mlp", batch_size=b, seq_len=512, n_queries=16,
                              query_len=64, query_rank=rank, n_candidates=1000,
                              autocast_dtype="bfloat16")  # fmt: skip
            plan = predict(cfg, o, device="cuda")
            t = plan.terms["cached scoring"]
            big = max((k for k in t if k != PHASE_FACTORS), key=t.get)
            out.append({"batch": f"{b} × 512", "query_rank": rank,
                        "predicted_gib": plan.peak["cached scoring"] / GiB,
                        "below_24_gib": plan.peak["cached scoring"] < 24 * GiB,
                        "peak_phase": big, "phase_gib": t[big] / GiB,
                        "factors_gib": t[PHASE_FACTORS] / GiB,
                        "candidate_activations_gib": plan.activations["scoring"](
                            b, 512, 24) / GiB})  # fmt: skip
    return out


def run(sizes: Sequence[Size] = SIZES, candidates: Sequence[str] = CANDIDATES,
        ranks: Sequence[int | None] = (None, RANK), progress: bool = True) -> dict:
    """Every (size, candidates, rank) row, each measured in a fresh subprocess."""
    rows: list[dict] = []
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="msif-scoring-peak-"))
    words = _single_token_words(tokenizer(tmp / "tokenizer"))
    for size in sizes:
        for streamed in (c == "streamed" for c in candidates):
            for rank in ranks:
                spec = {"size": asdict(size), "rank": rank, "streamed": streamed,
                        "tokenizer": str(tmp / "tokenizer"), "words": words,
                        "cache": str(tmp / f"cache-{len(rows)}")}  # fmt: skip
                t1 = time.perf_counter()
                m = run_row(["-m", "msif_lite.bench.scoring_peak"], spec)
                row = {**plan_row(size, streamed, rank, m), "seconds": time.perf_counter() - t1}
                rows.append(row)
                if progress:
                    print(f"{size.name:6s} {row['candidates']:8s} r={rank!s:5s} pred "
                          f"{row['predicted_gib']:.4f} meas {row['measured_gib']:.4f} GiB "
                          f"({row['ratio']:.2f}×) {row['seconds']:.0f} s", flush=True)
    return {"rows": rows, "bloom560m_predicted": bloom560m_prediction(),
            "sizes": [asdict(s) for s in sizes], "target": TARGET, "method": METHOD,
            "chunk_docs": CHUNK_DOCS, "historical": HISTORICAL, "threads": 1,
            "measured_by": "peak RSS growth of Attributor.scores (VmHWM − VmRSS, reset before "
                           "the call) in a fresh subprocess per row with "
                           "MALLOC_MMAP_THRESHOLD_=65536, + the two stages' factors it holds",
            "total_s": time.perf_counter() - t0}  # fmt: skip


def markdown(res: dict) -> str:
    rows = res["rows"]
    ok = [abs(r["ratio"] - 1) < res["target"] for r in rows]
    ratios = [r["ratio"] for r in rows]
    span = f" ({min(ratios):.2f}–{max(ratios):.2f}×)" if ratios else ""
    lines = [
        f"# Scoring peak of Attributor.scores ({res['method']}, MLP layers): predicted vs "
        "measured (CPU, one thread)",
        "",
        f"{sum(ok)}/{len(ok)} rows within ±{res['target']:.0%}{span}, queries preconditioned "
        f"layer by layer. Measured: {res['measured_by']}. Total {res.get('total_s', 0):.0f} s.",
        "",
        markdown_table(rows, ["size", "candidates", "query_rank", "predicted_gib",
                              "measured_gib", "ratio", "predicted_phase"], floatfmt=".4g"),
        "",
        "## BLOOM-560m shape, predicted (MLP layers, 16 queries × 1,000 candidates, streamed)",
        "",
        markdown_table(res["bloom560m_predicted"], ["batch", "query_rank", "predicted_gib",
                                                    "below_24_gib", "peak_phase", "phase_gib",
                                                    "factors_gib",
                                                    "candidate_activations_gib"],
                       floatfmt=".3g"),  # fmt: skip
        "",
        "## Historical (the dense path, removed)",
        "",
        res.get("historical", HISTORICAL),
    ]
    return "\n".join(lines) + "\n"


def _rank(text: str) -> int | None:
    return None if text.strip() == "full" else int(text)


def main(argv: Sequence[str] | None = None) -> BenchResult | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, JSON in and out
    p.add_argument("--out", default="results", help="results directory")
    p.add_argument("--sizes", default=",".join(s.name for s in sizes()),
                   help="which sizes (MSIF_FAST=1: tiny)")  # fmt: skip
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help="stored (gradients written, under the disk budget) and/or streamed")
    p.add_argument("--ranks", default=",".join(RANKS),
                   help="query ranks: 'full' and/or an integer r")  # fmt: skip
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.row:
        print(json.dumps(measure_row(json.loads(a.row))))
        return None
    chosen = [s for s in (*SIZES, *FAST_SIZES) if s.name in a.sizes.split(",")]
    cands = a.candidates.split(",")
    if not chosen or not set(cands) <= set(CANDIDATES):
        p.error(f"--sizes from {[s.name for s in (*SIZES, *FAST_SIZES)]}, --candidates from "
                f"{list(CANDIDATES)}")  # fmt: skip
    res = run(chosen, cands, [_rank(r) for r in a.ranks.split(",")])
    return finish("scoring_peak", res, markdown(res), a.out)


BENCH = Benchmark("scoring-peak", "Attributor.scores' planned vs measured scoring peak (layer "
                  "by layer, stored and streamed candidates, full rank and rank 8, reduced "
                  "BLOOM sizes) and the BLOOM-560m prediction", main)  # fmt: skip

if __name__ == "__main__":
    main(sys.argv[1:])

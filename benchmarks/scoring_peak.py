"""The scoring peak of `Attributor.scores`: predicted vs measured, layer by layer vs the dense
path it replaced, at reduced BLOOM shapes on the CPU (issue 16).

    python benchmarks/scoring_peak.py [--sizes small,large]

Each row runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 (allocations of
64 KiB and more are mmapped and returned when freed, so resident memory follows the live
bytes; with glibc's default dynamic threshold freed heap is kept and RSS runs 30-60 % above
the live bytes, see results/memory_plan.md). A row builds a random-init BLOOM of the size,
an Attributor on documents of exactly `seq_len` tokens and 16 questions of `query_len`
tokens, fits both stages' factors (MLP layers only, as the BLOOM-560m target), warms up on
other questions and documents, then measures `Attributor.scores("multi_stage", …)` with
`memory.measure_rss_peak` (VmHWM − VmRSS, high-water mark reset, free heap returned first)
plus the factors it holds (what `MemoryPlan.peak["cached scoring"]` counts). Candidates are
stored (under the disk budget: their gradients are computed and written during the call) or
streamed (a budget of 0). Baseline, measured in the same run: the dense path this replaced
(the code of GradientMethod.preconditioned before: every layer's ∇m, then P of every layer,
then, for rank r, the truncation), scored by the same store. Writes results/scoring_peak.json
and .md, with the BLOOM-560m shape predicted (16 queries × 1,000 candidates).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from msif_lite.bench.common import (  # noqa: E402
    bloom560m_config,
    markdown_table,
    run_row,
    write_results,
)
from msif_lite.scale.memory import GiB, MemoryOptions, nbytes, predict  # noqa: E402

TARGET = 0.2
RANK = 8
CHUNK_DOCS = 4  # stored gradients held at once (BLOOM-560m: 1 document per 1 GiB chunk)
METHOD = "multi_stage"


@dataclass(frozen=True)
class Size:
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


def bloom_config(size: Size):
    from transformers import BloomConfig

    return BloomConfig(vocab_size=size.vocab, hidden_size=size.hidden, n_layer=size.n_layer,
                       n_head=size.heads, attention_dropout=0.0, hidden_dropout=0.0)


def options(size: Size, query_len: int, rank: int | None, layerwise: bool,
            streamed: bool, chunk_mb: float) -> MemoryOptions:  # fmt: skip
    return MemoryOptions(include="mlp", batch_size=size.batch_size, seq_len=size.seq_len,
                         n_queries=size.n_queries, query_len=query_len, query_rank=rank,
                         layerwise=layerwise, n_candidates=size.n_candidates,
                         gradient_cache_gb=0.0 if streamed else 1e6,
                         chunk_mb=chunk_mb)  # fmt: skip


# ------------------------------------------------------------------ inputs of exact length
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
    qs = [type("Q", (), {"prompt": pick(12), "answer": pick(2)})()
          for _ in range(size.n_queries)]  # fmt: skip
    return docs, qs


def tokenizer(out: Path):
    from transformers import AutoTokenizer

    from msif_lite.world.generate import make_world
    from msif_lite.world.lm import train_tokenizer

    if not (out / "tokenizer.json").exists():
        train_tokenizer(make_world("ci-fast", seed=0), out)
    return AutoTokenizer.from_pretrained(out)


# ------------------------------------------------------------------ one row, in a subprocess
def old_scores(att, method, questions, doc_ids, rank):
    """`Attributor.scores(method, …)` as it ran before the layer-by-layer change: ∇m of every
    layer, then P of every layer (`precondition`), then (rank r) truncated, then the store."""
    from msif_lite.engine.lowrank import LowRankGrads, truncate
    from msif_lite.engine.scores import precondition

    def preconditioned():  # the old GradientMethod.preconditioned (+ truncation)
        qg = att.query_grads(questions, method.query_at)
        pre = precondition(qg, method.preconditioner(att, att.settings))
        if rank is None:
            return att.rename(pre, method.candidates_at)
        low = truncate(pre, rank)
        return LowRankGrads(att.rename(low.left, method.candidates_at),
                            att.rename(low.right, method.candidates_at), rank)

    pre = preconditioned()
    layers = att.store(method.candidates_at).scores(pre, att.candidates(doc_ids),
                                                    by_module=True).double()  # fmt: skip
    return method.finish(layers, None, method.layer_mask(att))


def measure_row(spec: dict) -> dict:
    from transformers import BloomForCausalLM

    from msif_lite.attribution.attributor import AttributionConfig, Attributor
    from msif_lite.attribution.methods import get_method
    from msif_lite.engine.factors import FactorConfig
    from msif_lite.scale.memory import measure_rss_peak

    torch.set_num_threads(1)
    size, rank, layerwise = Size(**spec["size"]), spec["rank"], spec["layerwise"]
    tok = tokenizer(Path(spec["tokenizer"]))
    torch.manual_seed(0)
    pt = BloomForCausalLM(bloom_config(size)).eval()
    ft = copy.deepcopy(pt)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    words = spec["words"]
    docs, qs = inputs(words, size, 1)
    warm_docs, warm_qs = inputs(words, size, 2)
    fit_docs, fit_pairs = inputs(words, size, 3)
    cfg = AttributionConfig(factors=FactorConfig(include="mlp", max_batches=2), progress=False,
                            batch_size=size.batch_size, cache_dir=spec["cache"],
                            context_length=max(512, size.seq_len + 1),
                            gradient_cache_gb=0.0 if spec["streamed"] else 1e6)  # fmt: skip
    att = Attributor(pt, ft, tok, docs + warm_docs + fit_docs,
                     [(q.prompt, q.answer) for q in fit_pairs], cfg, alpha=0.01)  # fmt: skip
    held = nbytes(att.pretrain_factors) + nbytes(att.finetune_factors)
    store = att.pretrained_store
    store.chunk_bytes = CHUNK_DOCS * store.bytes_per_document()  # as at scale: a few per chunk
    m = get_method(METHOD)
    ids, warm = [d for d, _ in docs], [d for d, _ in warm_docs[:2]]
    lens = {len(att.candidate(d).input_ids) for d in ids}
    q_lens = {len(att.qa_example(q.prompt, q.answer).input_ids) for q in qs}
    if layerwise:
        def fn(questions=qs, doc_ids=ids):
            return att.scores(m, questions, doc_ids, query_rank=rank)
    else:
        def fn(questions=qs, doc_ids=ids):
            return old_scores(att, m, questions, doc_ids, rank)
    fn(warm_qs[:2], warm)  # warm-up: kernels, lazily built state; other questions and documents
    peak, scores = measure_rss_peak(fn)
    return {"measured_bytes": peak + held, "held_bytes": held,
            "chunk_mb": store.chunk_bytes / 2**20, "doc_tokens": sorted(lens),
            "query_tokens": sorted(q_lens), "streams": att.pretrained_store.streams(len(ids)),
            "scores_sum": float(scores.sum())}


# ------------------------------------------------------------------ the benchmark
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
            new = predict(cfg, o, device="cuda")
            old = predict(cfg, replace(o, layerwise=False), device="cuda")
            t = new.terms["cached scoring"]
            big = max((k for k in t if k != "factors on device"), key=t.get)
            out.append({"batch": f"{b} × 512", "query_rank": rank,
                        "old_gib": old.peak["cached scoring"] / GiB,
                        "new_gib": new.peak["cached scoring"] / GiB,
                        "below_24_gib": new.peak["cached scoring"] < 24 * GiB,
                        "peak_phase": big, "factors_gib": t["factors on device"] / GiB,
                        "phase_gib": t[big] / GiB,
                        "candidate_activations_gib": new.activations["scoring"](
                            b, 512, 24) / GiB})  # fmt: skip
    return out


def run(sizes=SIZES, progress: bool = True) -> dict:
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="msif-scoring-peak-"))
    words = _single_token_words(tokenizer(tmp / "tokenizer"))
    for size in sizes:
        for streamed in (False, True):
            for rank in (None, RANK):
                for layerwise in (True, False):
                    spec = {"size": asdict(size), "rank": rank, "layerwise": layerwise,
                            "streamed": streamed, "tokenizer": str(tmp / "tokenizer"),
                            "words": words, "cache": str(tmp / f"cache-{len(rows)}")}  # fmt: skip
                    t0 = time.perf_counter()
                    m = run_row([__file__], spec)
                    assert m["doc_tokens"] == [size.seq_len] and len(m["query_tokens"]) == 1
                    assert m["streams"] == streamed
                    o = options(size, m["query_tokens"][0], rank, layerwise, streamed,
                                m["chunk_mb"])
                    plan = predict(bloom_config(size), o, device="cpu")
                    pred, meas = plan.peak["cached scoring"], m["measured_bytes"]
                    t = plan.terms["cached scoring"]
                    row = {"size": size.name, "candidates": "streamed" if streamed else "stored",
                           "query_rank": rank, "path": "layer by layer" if layerwise
                           else "dense (old)", "predicted_gib": pred / GiB,
                           "measured_gib": meas / GiB, "ratio": pred / meas,
                           "predicted_phase": max((k for k in t if k != "factors on device"),
                                                  key=t.get),
                           "held_gib": m["held_bytes"] / GiB, "scores_sum": m["scores_sum"],
                           "seconds": time.perf_counter() - t0}  # fmt: skip
                    rows.append(row)
                    if progress:
                        print(f"{size.name:6s} {row['candidates']:8s} r={rank!s:5s} "
                              f"{row['path']:15s} pred {row['predicted_gib']:.4f} meas "
                              f"{row['measured_gib']:.4f} GiB ({row['ratio']:.2f}×) "
                              f"{row['seconds']:.0f} s", flush=True)  # fmt: skip
    return {"rows": rows, "bloom560m_predicted": bloom560m_prediction(),
            "sizes": [asdict(s) for s in sizes], "target": TARGET, "method": METHOD,
            "measured_by": "peak RSS growth of Attributor.scores (VmHWM − VmRSS, reset before "
                           "the call) in a fresh subprocess per row with "
                           "MALLOC_MMAP_THRESHOLD_=65536, + the two stages' factors it holds",
            "threads": 1}


def markdown(res: dict) -> str:
    rows = res["rows"]
    ok = [abs(r["ratio"] - 1) < TARGET for r in rows]
    pairs = {}
    for r in rows:
        pairs.setdefault((r["size"], r["candidates"], r["query_rank"]), {})[r["path"]] = r
    cmp = [{"size": s, "candidates": c, "query_rank": q,
            "old_measured_gib": p["dense (old)"]["measured_gib"],
            "new_measured_gib": p["layer by layer"]["measured_gib"],
            "saved": 1 - p["layer by layer"]["measured_gib"] / p["dense (old)"]["measured_gib"],
            "same_scores": abs(p["layer by layer"]["scores_sum"] / p["dense (old)"]["scores_sum"]
                               - 1) < 1e-4 if q is None else None}
           for (s, c, q), p in pairs.items()]  # fmt: skip
    lines = [
        f"# Scoring peak of Attributor.scores ({res['method']}, MLP layers): predicted vs "
        "measured (CPU, one thread)",
        "",
        f"{sum(ok)}/{len(ok)} rows within ±{TARGET:.0%}. Measured: {res['measured_by']}. "
        "Baseline 'dense (old)': the path before (every layer's ∇m, then P of every layer, "
        f"then for rank {RANK} the truncation), scored by the same store, in the same run.",
        "",
        markdown_table(rows, ["size", "candidates", "query_rank", "path", "predicted_gib",
                              "measured_gib", "ratio", "predicted_phase"], floatfmt=".4g"),
        "",
        "## Old vs new, measured",
        "",
        markdown_table(cmp, ["size", "candidates", "query_rank", "old_measured_gib",
                             "new_measured_gib", "saved", "same_scores"], floatfmt=".3g"),
        "",
        "## BLOOM-560m shape, predicted (MLP layers, 16 queries × 1,000 candidates, streamed)",
        "",
        markdown_table(res["bloom560m_predicted"], ["batch", "query_rank", "old_gib", "new_gib",
                                                    "below_24_gib", "peak_phase", "phase_gib",
                                                    "factors_gib",
                                                    "candidate_activations_gib"],
                       floatfmt=".3g"),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--out", default="results")
    p.add_argument("--sizes", default=",".join(s.name for s in SIZES))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.row:
        print(json.dumps(measure_row(json.loads(a.row))))
        return None
    t0 = time.perf_counter()
    res = run([s for s in SIZES if s.name in a.sizes.split(",")])
    res["total_s"] = time.perf_counter() - t0
    md = markdown(res)
    write_results("scoring_peak", res, md, a.out)
    print(md)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

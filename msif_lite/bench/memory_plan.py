"""Does the memory plan hold? `memory.predict` versus resident memory and disk, measured.

`python benchmarks/memory_plan.py` (or `msif-lite bench memory-plan` where the CLI lists it)
builds small random-init Llama and GPT-2 models from configs (no hub) at three sizes and,
for every stage the plan predicts, runs that stage in a **fresh subprocess** and measures the
peak resident memory above the level just before the stage (`memory.measure_rss_peak`:
VmHWM − VmRSS, high-water mark reset, free heap returned first), plus the tensor bytes the
stage inherits that the plan counts (the factors of earlier stages, the cached captures) —
the convention of `MemoryPlan.peak`. The subprocesses run with
MALLOC_MMAP_THRESHOLD_=65536, so freed tensors go back to the system and RSS follows the live
bytes; with glibc's default (dynamic) threshold, freed heap memory is kept and fragmented,
and RSS runs 30–60 % above the live bytes at these sizes (rows marked `glibc default
malloc` show it; a GPU allocator has no such slack). Disk: the bytes the gradient store
wrote for the candidates (cached scoring). Rows with `query_rank` compare scoring with
low-rank queries before (dense preconditioning of all layers first, `layerwise=False`) and
after (layer by layer) in the same run, and the BLOOM-560m shape is predicted (16 queries ×
1,000 candidates, rank 32) without running. Writes results/memory_plan.json + .md.

Stages: covariance, eigendecomposition, lambda (as `fit_ekfac` runs them, captures cached),
scoring (`pairwise_scores` on a query batch, multi-stage with two EK-FACs, candidates
streamed), cached scoring (the `Attributor` path: the method's inverse built, the queries
preconditioned layer by layer, `GradientStore.scores` computing and writing the candidates'
gradients; `Attributor.scores` itself is measured by benchmarks/scoring_peak.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from msif_lite.bench.common import bloom560m_config, markdown_table, run_row, write_results
from msif_lite.scale.memory import GiB, MemoryOptions, nbytes, predict

STAGE_NAMES = ("covariance", "eigendecomposition", "lambda", "scoring", "cached scoring")
TARGET = 0.2  # |predicted / measured − 1|


@dataclass(frozen=True)
class Size:
    """One benchmark shape (both architectures) and its workload."""

    name: str
    hidden: int
    n_layer: int
    vocab: int
    batch_size: int = 4
    seq_len: int = 128
    n_batches: int = 3
    n_queries: int = 8
    query_len: int = 32
    n_candidates: int = 24


SIZES = (Size("small", 128, 2, 4000), Size("medium", 256, 2, 8000), Size("large", 384, 4, 16000))
ARCHS = ("llama", "gpt2")
RANK = 8


def build_config(arch: str, size: Size):
    """A transformers config of `arch` at `size` (heads of width 32, dropout off)."""
    from transformers import GPT2Config, LlamaConfig

    heads = size.hidden // 32
    if arch == "llama":
        return LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden,
                           intermediate_size=int(size.hidden * 8 / 3) // 8 * 8,
                           num_hidden_layers=size.n_layer, num_attention_heads=heads,
                           num_key_value_heads=heads, max_position_embeddings=512)  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(vocab_size=size.vocab, n_embd=size.hidden, n_layer=size.n_layer,
                          n_head=heads, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, bos_token_id=size.vocab - 1,
                          eos_token_id=size.vocab - 1)  # fmt: skip
    raise ValueError(f"unknown arch {arch!r}: use one of {ARCHS}")


def options(size: Size, rank: int | None = None, layerwise: bool = True) -> MemoryOptions:
    return MemoryOptions(batch_size=size.batch_size, seq_len=size.seq_len,
                         fit_tokens=size.batch_size * size.seq_len * size.n_batches,
                         n_queries=size.n_queries, query_len=size.query_len,
                         n_candidates=size.n_candidates, query_rank=rank,
                         layerwise=layerwise)  # fmt: skip


# ------------------------------------------------------------------ one row, in a subprocess
def _batches(vocab: int, b: int, t: int, n: int, seed: int):
    from msif_lite.engine.tasks import TokenBatch

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (b, t), generator=g) for _ in range(n)]
    return [TokenBatch(x, torch.ones_like(x), x.clone()) for x in ids]


def measure_row(arch: str, size: Size, stage: str, rank: int | None = None,
                layerwise: bool = True) -> dict:  # fmt: skip
    """Peak RSS growth of one stage (+ inherited tensor bytes), and the disk it wrote."""
    from transformers import AutoModelForCausalLM

    from msif_lite.engine.factors import FactorConfig
    from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_ekfac, fit_lambda
    from msif_lite.engine.gradstore import Candidate, GradientStore
    from msif_lite.engine.layers import find_modules
    from msif_lite.engine.multistage import MultiStageConfig, MultiStageIHVP
    from msif_lite.engine.scores import (
        pairwise_scores,
        precondition,
        preconditioned_queries,
        query_gradients,
    )
    from msif_lite.engine.tasks import LanguageModelingTask, make_token_batch
    from msif_lite.scale.memory import measure_rss_peak

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_config(arch, size)).eval()
    task, cfg = LanguageModelingTask(), FactorConfig(progress=False)
    mods = find_modules(model)
    batches = _batches(size.vocab, size.batch_size, size.seq_len, size.n_batches, 0)
    queries = _batches(size.vocab, size.n_queries, size.query_len, 1, 1)[0]
    held, disk, cache = 0, 0, []
    if stage == "covariance":
        fit_covariances(model, task, batches[:1], cfg, mods)  # warm-up

        def fn():
            return fit_covariances(model, task, batches, cfg, mods, cache=cache)
    elif stage in ("eigendecomposition", "lambda"):
        kfac = fit_covariances(model, task, batches, cfg, mods, cache=cache)
        if stage == "eigendecomposition":
            fit_eigenbasis(kfac)  # warm-up
            held = nbytes(kfac) + nbytes(cache)

            def fn():
                return fit_eigenbasis(kfac)
        else:
            eig = fit_eigenbasis(kfac)
            del kfac
            fit_lambda(model, task, batches[:1], eig, cfg, mods)  # warm-up
            held = nbytes(eig) + nbytes(cache)

            def fn():
                return fit_lambda(model, task, batches, eig, cfg, mods, cache=cache)
    else:
        ek = fit_ekfac(model, task, batches, cfg, mods)
        ft = copy.deepcopy(ek)  # stands in for the fine-tuning stage's factors
        ihvp = MultiStageIHVP.from_factors(ft, ek, MultiStageConfig(alpha=1.0))
        held = nbytes(ek) + nbytes(ft)
        warm_q = _batches(size.vocab, 2, size.query_len, 1, 3)[0]
        if stage == "scoring":
            pairwise_scores(model, task, warm_q, batches[:1], ihvp, mods, progress=False,
                            rank=rank, layerwise=layerwise)  # fmt: skip

            def fn():
                return pairwise_scores(model, task, queries, batches, ihvp, mods,
                                       progress=False, rank=rank, layerwise=layerwise)
        else:
            tmp = tempfile.mkdtemp(prefix="msif-memplan-")
            x = _batches(size.vocab, size.n_candidates, size.seq_len, 1, 2)[0].input_ids
            cands = [Candidate(f"d{i}", tuple(r.tolist()), tuple(r.tolist()))
                     for i, r in enumerate(x)]  # fmt: skip
            store = GradientStore(model, task, mods,
                                  lambda cs: make_token_batch([c.input_ids for c in cs], 0),
                                  Path(tmp) / "warm", batch_size=size.batch_size,
                                  progress=False)  # fmt: skip
            store.scores(precondition(query_gradients(model, task, warm_q, mods), ihvp),
                         cands[:2], by_module=True)  # warm-up (another directory)
            store = GradientStore(model, task, mods, store.collate, Path(tmp) / "run",
                                  batch_size=size.batch_size, progress=False)  # fmt: skip

            def fn():  # GradientMethod.layer_scores: its inverse (H_ft rescaled), P layer by
                # layer (preconditioned_queries), store.scores
                inv = MultiStageIHVP.from_factors(ft.scaled(1.0), ek, MultiStageConfig(alpha=1.0))
                pre = preconditioned_queries(model, task, queries, mods, inv, rank=rank,
                                             layerwise=layerwise)  # fmt: skip
                return store.scores(pre, cands, by_module=True)
    peak, _ = measure_rss_peak(fn)
    if stage == "cached scoring":
        disk = sum(f.stat().st_size for f in (Path(tmp) / "run").rglob("*") if f.is_file())
    return {"measured_bytes": peak + held, "held_bytes": held, "disk_bytes": disk}


def _row_subprocess(arch: str, size: Size, stage: str, rank, layerwise: bool,
                    default_malloc: bool = False) -> dict:  # fmt: skip
    spec = {"arch": arch, "size": asdict(size), "stage": stage, "rank": rank,
            "layerwise": layerwise}  # fmt: skip
    return run_row(["-m", "msif_lite.bench.memory_plan"], spec, default_malloc=default_malloc)


# ------------------------------------------------------------------ the benchmark
def _rank_label(rank, layerwise) -> str:
    if rank is None:
        return ""
    return f"rank {rank}, " + ("layer by layer" if layerwise else "dense preconditioning")


def run(sizes=SIZES, archs=ARCHS, progress: bool = True) -> dict:
    rows = []
    for arch in archs:
        for size in sizes:
            cfg = build_config(arch, size)
            jobs = [(st, None, True, False) for st in STAGE_NAMES]
            if size is sizes[-1]:  # low-rank queries before/after, at the largest size
                jobs += [("scoring", RANK, False, False), ("scoring", RANK, True, False)]
            if size is sizes[len(sizes) // 2]:  # RSS with glibc's default malloc settings
                jobs += [("covariance", None, True, True), ("scoring", None, True, True)]
            for stage, rank, lw, default_malloc in jobs:
                plan = predict(cfg, options(size, rank, lw), device="cpu")
                t0 = time.perf_counter()
                m = _row_subprocess(arch, size, stage, rank, lw, default_malloc)
                pred, meas = plan.peak[stage], m["measured_bytes"]
                variant = ", ".join(x for x in (_rank_label(rank, lw), "glibc default malloc"
                                                if default_malloc else "") if x)  # fmt: skip
                row = {"arch": arch, "size": size.name, "stage": stage, "variant": variant,
                       "predicted_gib": pred / GiB, "measured_gib": meas / GiB,
                       "ratio": pred / meas if meas else float("nan"),
                       "held_gib": m["held_bytes"] / GiB,
                       "predicted_disk_gb": (plan.disk / 1e9 if stage == "cached scoring"
                                             else 0.0),
                       "measured_disk_gb": m["disk_bytes"] / 1e9,
                       "seconds": time.perf_counter() - t0}  # fmt: skip
                rows.append(row)
                if progress:
                    print(f"{arch:6s} {size.name:7s} {stage:18s} {row['variant']:30s} "
                          f"pred {row['predicted_gib']:.4f} meas {row['measured_gib']:.4f} "
                          f"GiB ({row['ratio']:.2f}×) disk {row['predicted_disk_gb']:.4f}/"
                          f"{row['measured_disk_gb']:.4f} GB {row['seconds']:.0f} s",
                          flush=True)  # fmt: skip
    return {"rows": rows, "bloom560m_predicted": bloom560m_prediction(),
            "sizes": [asdict(s) for s in sizes], "target": TARGET,
            "measured_by": "peak RSS growth (VmHWM − VmRSS, reset before the stage) in a fresh "
                           "subprocess per row with MALLOC_MMAP_THRESHOLD_=65536 (rows marked "
                           "'glibc default malloc': without it), + the inherited tensor bytes "
                           "the plan counts",
            "threads": 1}


def bloom560m_prediction() -> list[dict]:
    """The BLOOM-560m shape (all 96 linear layers, bf16 autocast fitting), 16 queries × 1,000
    candidates: scoring peaks before/after layer-by-layer preconditioning, and the disk."""
    cfg = bloom560m_config()
    out = []
    for include in (None, "mlp"):
        for rank in (None, 32):
            for lw in (False, True):
                o = MemoryOptions(include=include, batch_size=4, seq_len=512,
                                  autocast_dtype="bfloat16", n_queries=16, query_len=64,
                                  query_rank=rank, layerwise=lw, n_candidates=1000,
                                  gradient_cache_gb=1e6)  # fmt: skip
                p = predict(cfg, o, device="cuda")
                streamed = predict(cfg, replace_opts(o, gradient_cache_gb=20.0), device="cuda")
                proj = predict(cfg, replace_opts(o, projection=(64, 64)), device="cuda")
                out.append({"layers": include or "all", "query_rank": rank, "layerwise": lw,
                            "scoring_gib": p.peak["scoring"] / GiB,
                            "cached_scoring_gib": p.peak["cached scoring"] / GiB,
                            "streamed_cached_scoring_gib": streamed.peak["cached scoring"] / GiB,
                            "dense_cache_disk_gb": p.disk / 1e9,
                            "projected_64x64_disk_gb": proj.disk / 1e9,
                            "fit_peak_gib": max(p.peak[s] for s in STAGE_NAMES[:3]) / GiB})
    return out


def replace_opts(o: MemoryOptions, **kw) -> MemoryOptions:
    from dataclasses import replace

    return replace(o, **kw)


def markdown(res: dict) -> str:
    rows = res["rows"]
    ok = [abs(r["ratio"] - 1) < TARGET for r in rows if "malloc" not in r["variant"]]
    disk = [r for r in rows if r["stage"] == "cached scoring"]
    disk_ok = [abs(r["predicted_disk_gb"] / r["measured_disk_gb"] - 1) < TARGET for r in disk]
    lines = [
        "# Memory plan: predicted vs measured (CPU, one thread)",
        "",
        f"{sum(ok)}/{len(ok)} stage rows within ±{TARGET:.0%} (memory, mmap threshold "
        "64 KiB; the glibc-default rows are shown apart), "
        f"{sum(disk_ok)}/{len(disk_ok)} within ±{TARGET:.0%} (disk). Measured: "
        f"{res['measured_by']}.",
        "",
        markdown_table(rows, ["arch", "size", "stage", "variant", "predicted_gib",
                              "measured_gib", "ratio", "predicted_disk_gb",
                              "measured_disk_gb"], floatfmt=".4g"),  # fmt: skip
        "",
        "## BLOOM-560m shape, predicted (16 queries × 1,000 candidates, batch 4 × 512)",
        "",
        markdown_table(res["bloom560m_predicted"], ["layers", "query_rank", "layerwise",
                                                    "scoring_gib", "cached_scoring_gib",
                                                    "streamed_cached_scoring_gib",
                                                    "dense_cache_disk_gb",
                                                    "projected_64x64_disk_gb",
                                                    "fit_peak_gib"]),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, JSON in and out
    p.add_argument("--out", default="results", help="results directory")
    p.add_argument("--sizes", default=",".join(s.name for s in SIZES))
    p.add_argument("--archs", default=",".join(ARCHS))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.row:
        spec = json.loads(a.row)
        res = measure_row(spec["arch"], Size(**spec["size"]), spec["stage"], spec["rank"],
                          spec["layerwise"])  # fmt: skip
        print(json.dumps(res))
        return None
    sizes = [s for s in SIZES if s.name in a.sizes.split(",")]
    t0 = time.perf_counter()
    res = run(sizes, a.archs.split(","))
    res["total_s"] = time.perf_counter() - t0
    md = markdown(res)
    write_results("memory_plan", res, md, a.out)
    print(md)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])

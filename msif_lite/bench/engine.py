"""How much the curvature engine costs relative to plain training passes.

Measures, on the paper's toy GPT-NeoX (2 layers, hidden 256, intermediate 1024) over
256 sequences x 128 tokens, in one run:
  - fwd_bwd_s: one plain forward + backward (weight gradients included) over the data;
  - EK-FAC fitting: covariance_s, eigendecomposition_s, lambda_s (msif_lite.engine.factors);
  - score_s: pairwise scores of 16 queries against all sequences (incl. query gradients);
and writes results/engine_overhead.json and results/engine_overhead.md.

Targets: fit_over_fwd_bwd <= 3.5, score_over_fwd_bwd <= 1.3.
Each stage is the best of MSIF_BENCH_REPEATS runs (default 2; 1 under MSIF_FAST), with the
baseline interleaved.
Run: `msif-lite bench engine [--out DIR]` (MSIF_FAST=1 shrinks everything for CI).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import time
from collections.abc import Sequence

import torch

from msif_lite.bench.common import Benchmark, BenchResult, finish
from msif_lite.config import describe_run, device, pick
from msif_lite.engine.factors import FactorConfig, FitTimings
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP
from msif_lite.engine.layers import find_modules
from msif_lite.engine.scores import pairwise_scores
from msif_lite.engine.tasks import LanguageModelingTask, TokenBatch


def rss_mb() -> float:
    """Peak resident memory of this process so far (MiB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_setup(dev: torch.device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sizes = dict(
        hidden=pick(256, 64), intermediate=pick(1024, 256), layers=2, heads=pick(4, 2),
        vocab=pick(4096, 512), n_seq=pick(256, 32), seq_len=pick(128, 32),
        batch_size=pick(32, 8), n_queries=pick(16, 4),
    )
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=sizes["vocab"], hidden_size=sizes["hidden"],
        num_hidden_layers=sizes["layers"], num_attention_heads=sizes["heads"],
        intermediate_size=sizes["intermediate"], max_position_embeddings=sizes["seq_len"],
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = GPTNeoXForCausalLM(cfg).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, sizes["vocab"], (sizes["n_seq"], sizes["seq_len"]), generator=g)
    mask = torch.ones_like(ids)
    bs = sizes["batch_size"]
    batches = [
        TokenBatch(ids[i : i + bs], mask[i : i + bs], ids[i : i + bs].clone()).to(dev)
        for i in range(0, len(ids), bs)
    ]
    q = ids[: sizes["n_queries"]].flip(1).contiguous()
    queries = TokenBatch(q, torch.ones_like(q), q.clone()).to(dev)
    return model, batches, queries, sizes


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(model, task, batches, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    for b in batches:
        task.loss(model, b).sum().backward()
        model.zero_grad(set_to_none=True)
    sync(dev)
    return time.perf_counter() - t0


def markdown(result: dict) -> str:
    """The markdown table of engine_overhead.md."""
    fwd_bwd_s, fit_s, score_s = result["fwd_bwd_s"], result["fit_s"], result["score_s"]
    cov, eig, lam = result["covariance_s"], result["eigendecomposition_s"], result["lambda_s"]
    rows = [
        ("plain forward + backward", fwd_bwd_s, 1.0, ""),
        ("EK-FAC covariances", cov, cov / fwd_bwd_s, ""),
        ("eigendecomposition", eig, eig / fwd_bwd_s, ""),
        ("EK-FAC Λ", lam, lam / fwd_bwd_s, ""),
        ("**EK-FAC fit total**", fit_s, fit_s / fwd_bwd_s, "≤ 3.5"),
        (f"pairwise scores ({result['data']['n_queries']} queries)", score_s,
         score_s / fwd_bwd_s, "≤ 1.3"),
    ]
    md = [
        "# Engine overhead", "",
        f"{result['device']}, {result['torch_threads']} threads, best of {result['repeats']}; "
        f"toy GPT-NeoX {result['model']}, data {result['data']}; peak memory "
        f"{result['peak_mem_mb']:.0f} MiB ({result['peak_mem_kind']}).", "",
        "| stage | seconds | × fwd+bwd | target |", "|---|---:|---:|---:|",
        *[f"| {n} | {s:.2f} | {r:.2f} | {tg} |" for n, s, r, tg in rows],
    ]
    return "\n".join(md) + "\n"


def main(argv: Sequence[str] | None = None) -> BenchResult:
    """`msif-lite bench engine [--out DIR]`: writes DIR/engine_overhead.{json,md}."""
    import argparse

    ap = argparse.ArgumentParser(prog="msif-lite bench engine", description=__doc__)
    ap.add_argument("--out", default="results", help="where engine_overhead.* go")
    out = ap.parse_args(argv).out
    dev = device()
    model, batches, queries, sizes = make_setup(dev)
    task = LanguageModelingTask()
    modules = find_modules(model)
    # warm-up (allocator, kernels), not timed
    fwd_bwd(model, task, batches[:1], dev)
    fit_ekfac(model, task, batches[:1], FactorConfig(progress=False))
    # Interleave the baseline with the engine and keep each stage's best of `repeats` runs,
    # so a noisy shared machine slows baseline and engine alike.
    repeats = int(os.environ.get("MSIF_BENCH_REPEATS", pick(2, 1)))
    best: dict[str, float] = {}
    rss0 = rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        runs = {"fwd_bwd_s": fwd_bwd(model, task, batches, dev)}
        factors = fit_ekfac(model, task, batches, FactorConfig(progress=False))
        runs.update(dataclasses.asdict(factors.timings))
        ihvp = EKFACIHVP(factors)
        sync(dev)
        t0 = time.perf_counter()
        scores = pairwise_scores(model, task, queries, batches, ihvp, modules, progress=False)
        sync(dev)
        runs["score_s"] = time.perf_counter() - t0
        best = {k: min(v, best.get(k, float("inf"))) for k, v in runs.items()}
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else rss_mb() - rss0)
    t = FitTimings(best["covariance_s"], best["eigendecomposition_s"], best["lambda_s"])
    fwd_bwd_s, score_s = best["fwd_bwd_s"], best["score_s"]
    fit_s = t.covariance_s + t.eigendecomposition_s + t.lambda_s
    n_params = sum(m.numel for m in modules)
    result = {
        "fwd_bwd_s": fwd_bwd_s,
        "covariance_s": t.covariance_s,
        "eigendecomposition_s": t.eigendecomposition_s,
        "lambda_s": t.lambda_s,
        "fit_s": fit_s,
        "score_s": score_s,
        "fit_over_fwd_bwd": fit_s / fwd_bwd_s,
        "score_over_fwd_bwd": score_s / fwd_bwd_s,
        "peak_mem_mb": peak,
        "peak_mem_kind": "cuda max_memory_allocated" if dev.type == "cuda"
        else "ru_maxrss increase during fit + score",
        "scores_shape": list(scores.shape),
        "tracked_params": n_params,
        "model": {k: sizes[k] for k in ("hidden", "intermediate", "layers", "heads", "vocab")},
        "data": {k: sizes[k] for k in ("n_seq", "seq_len", "batch_size", "n_queries")},
        "repeats": repeats,
        "device": describe_run(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "targets": {"fit_over_fwd_bwd": 3.5, "score_over_fwd_bwd": 1.3},
    }
    return finish("engine_overhead", result, markdown(result), out)


BENCH = Benchmark("engine", "engine overhead: EK-FAC fit and scoring vs one forward+backward",
                  main)

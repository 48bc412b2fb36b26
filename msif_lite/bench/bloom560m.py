"""Time and memory of every stage at the BLOOM-560m shape, predicted versus measured.

`msif-lite bench bloom560m` builds a randomly initialised BLOOM (random weights are fine for
time and memory) and runs, on random tokens:
the forward+backward floor (one plain training pass over the fit tokens), the covariance
pass, the eigendecompositions, the Λ pass, and pairwise multi-stage scoring of 16 queries
against the candidates. Before each stage it prints `msif_lite.scale.memory.predict`'s plan and
refuses (check_fits) when a stage would not fit. Writes results/bloom560m.json + .md.

- With a GPU (torch.cuda.is_available()): the full shape — 24 blocks, hidden 1024, 16 heads,
  vocabulary 250,880, all 96 linear layers, 1,000,000 fit tokens (2 × 977 sequences × 512),
  bf16 autocast with float32 factors, 16 queries × 1,000 candidates. Target on one H200:
  fit_s < 300 s and peak_mem_gib < 24.
- On a CPU: a reduced size — 4 blocks, hidden 128, 4 heads, vocabulary 4,096, all 16 linear
  layers, 8,192 fit tokens (16 batches of 4 × 128 tokens), float32 (no autocast), 16
  queries × 32 candidates; one intra-op thread — recorded as such in the JSON (`size`).
`--size full|reduced|tiny` overrides the choice (tiny: seconds, for a CPU smoke test).
Scoring runs twice: full-rank queries, and rank-32 queries preconditioned layer by layer
(`engine.scores.preconditioned_queries`), whose predicted peak at the full shape is < 24 GiB.
Time predictions: FLOPs per stage divided by the throughput the floor measured (eigh: a
512×512 float64 probe scaled by n³).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch

from msif_lite.bench.common import Benchmark, BenchResult, Timer, finish, markdown_table
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_covariances, fit_eigenbasis, fit_lambda
from msif_lite.engine.layers import find_modules
from msif_lite.engine.multistage import MultiStageConfig, MultiStageIHVP
from msif_lite.engine.scores import pairwise_scores, query_gradients
from msif_lite.engine.tasks import LanguageModelingTask, TokenBatch
from msif_lite.scale.memory import GiB, MemoryOptions, check_fits, measure_peak, nbytes, predict


@dataclass(frozen=True)
class Size:
    """A benchmark shape."""

    name: str
    hidden: int
    n_layer: int
    n_head: int
    vocab: int
    seq_len: int
    batch_size: int
    fit_tokens: int
    n_queries: int
    query_len: int
    n_candidates: int
    autocast: str | None


FULL = Size("full (BLOOM-560m shape)", 1024, 24, 16, 250880, 512, 4, 1_000_000, 16, 64, 1000,
            "bfloat16")
REDUCED = Size("reduced (CPU)", 128, 4, 4, 4096, 128, 4, 8192, 16, 32, 32, None)
TINY = Size("tiny (CPU smoke test)", 32, 2, 2, 500, 32, 2, 256, 4, 16, 4, None)
SIZES = {"full": FULL, "reduced": REDUCED, "tiny": TINY}
LOW_RANK = 32  # the rank of the extra low-rank scoring stage (memory.MemoryOptions.query_rank)


def _batches(size: Size, n_seq: int, seq_len: int, seed: int) -> list[TokenBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n_seq, size.batch_size):
        ids = torch.randint(0, size.vocab, (min(size.batch_size, n_seq - i), seq_len), generator=g)
        out.append(TokenBatch(ids, torch.ones_like(ids), ids.clone()))
    return out


def _flops(model, size: Size, mods) -> dict[str, float]:
    """Per-token FLOPs: forward F = 2·P_lin + 2·d·V + 4·L·T·d; a training step 3F; a capture
    2F (no weight gradients); the factor GEMMs per tracked layer."""
    p_lin = sum(m.in_features * m.out_features for m in find_modules(model, None, None))
    f = 2 * p_lin + 4 * size.n_layer * size.seq_len * size.hidden
    cov = sum(2 * (m.d_in**2 + m.out_features**2) for m in mods)
    rot = sum(2 * (m.d_in**2 + m.out_features**2 + m.d_in * m.out_features) for m in mods)
    dw = sum(2 * m.d_in * m.out_features for m in mods)
    return {"floor": 3 * f, "covariance": 2 * f + cov, "lambda": 2 * f + rot,
            "candidate": 2 * f + dw, "per_query_candidate": dw / size.seq_len}  # fmt: skip


def _eigh_rate(device) -> float:
    """Seconds per n³ of a float64 eigh on `device` (one 512×512 probe)."""
    x = torch.randn(512, 512, dtype=torch.float64, device=device)
    a = x @ x.T
    torch.linalg.eigh(a)
    with Timer() as t:
        torch.linalg.eigh(a)
    return t.seconds / 512**3


def _floor(model, task, batches, size: Size, device: torch.device) -> None:
    """One forward + backward over `batches`: the cost every stage is compared with."""
    for b in batches:
        with torch.autocast(device.type, dtype=getattr(torch, size.autocast or "float32"),
                            enabled=size.autocast is not None):
            task.loss(model, b).sum().backward()
    model.zero_grad(set_to_none=True)


class _Stages:
    """Times and meters each stage: the timed run's peak on a GPU (max_memory_allocated costs
    nothing); on a CPU, the profiler slows a run down, so a separate 2-batch run is metered."""

    def __init__(self, predicted: dict, cpu: bool):
        self.predicted, self.cpu = predicted, cpu
        self.rows: list[dict] = []
        self.measured: dict[str, tuple[float, int]] = {}

    def __call__(self, name, fn, mem_fn, held=0, pred_s=float("nan")):
        print(f"[{name}] predicted peak {self.predicted.get(name, 0) / GiB:.3f} GiB", flush=True)
        with Timer() as t:
            peak, out = (0, fn()) if self.cpu else measure_peak(fn)
        if self.cpu:
            peak, _ = measure_peak(mem_fn)
        self.measured[name] = (t.seconds, peak + held)
        self.rows.append({"stage": name, "predicted_s": pred_s, "measured_s": t.seconds,
                          "predicted_gib": self.predicted.get(name, float("nan")) / GiB,
                          "measured_gib": (peak + held) / GiB})  # fmt: skip
        return out


def run(size: Size, device: torch.device, progress: bool = False) -> dict:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=size.vocab, hidden_size=size.hidden, n_layer=size.n_layer,
                      n_head=size.n_head, attention_dropout=0.0, hidden_dropout=0.0)
    opts = MemoryOptions(batch_size=size.batch_size, seq_len=size.seq_len,
                         fit_tokens=size.fit_tokens, autocast_dtype=size.autocast,
                         cache_activations_mb=0.0, n_queries=size.n_queries,
                         query_len=size.query_len)  # fmt: skip
    plan = predict(cfg, opts, device)  # from the config alone, before building anything
    print(plan)
    check_fits(plan, device, models_resident=1,  # the stages run here, scoring with 2 EK-FACs
               stages=("covariance", "eigendecomposition", "lambda", "scoring"))
    model = BloomForCausalLM(cfg).to(device).eval()
    task, mods = LanguageModelingTask(), find_modules(model)
    fcfg = FactorConfig(progress=progress, cache_activations_mb=0.0,
                        autocast_dtype=size.autocast, max_tokens=size.fit_tokens)  # fmt: skip
    n_seq = math.ceil(size.fit_tokens / size.seq_len)
    fit = [b.to(device) for b in _batches(size, n_seq, size.seq_len, 0)]
    tokens = n_seq * size.seq_len
    fl = _flops(model, size, mods)
    cpu = device.type == "cpu"
    mem_batches = fit[:2] if cpu else fit  # CPU: memory from a profiled 2-batch run
    stage = _Stages(dict(plan.peak), cpu)

    _floor(model, task, fit[:1], size, device)  # warm-up (allocator, kernels) before timing
    with Timer() as t_floor:
        _floor(model, task, fit, size, device)
    fl_peak, _ = measure_peak(lambda: _floor(model, task, mem_batches, size, device))
    rate = fl["floor"] * tokens / t_floor.seconds  # FLOP/s the floor achieved
    stage.rows.append({"stage": "forward+backward floor", "predicted_s": float("nan"),
                       "measured_s": t_floor.seconds, "predicted_gib": float("nan"),
                       "measured_gib": fl_peak / GiB})  # fmt: skip
    eig_rate = _eigh_rate(device)
    kfac = stage("covariance", lambda: fit_covariances(model, task, fit, fcfg, mods),
                 lambda: fit_covariances(model, task, mem_batches, fcfg, mods),
                 pred_s=fl["covariance"] * tokens / rate)
    n3 = sum(m.d_in**3 + m.out_features**3 for m in mods)
    eig = stage("eigendecomposition", partial(fit_eigenbasis, kfac), partial(fit_eigenbasis, kfac),
                held=nbytes(kfac), pred_s=n3 * eig_rate)
    del kfac
    ek = stage("lambda", partial(fit_lambda, model, task, fit, eig, fcfg, mods),
               partial(fit_lambda, model, task, mem_batches, eig, fcfg, mods),
               held=nbytes(eig), pred_s=fl["lambda"] * tokens / rate)
    del eig
    low_plan = predict(cfg, replace(opts, query_rank=min(LOW_RANK, size.hidden)), device)
    _scoring(stage, model, task, mods, ek, size, device, progress, fl, rate, low_plan)
    return _payload(size, device, tokens, stage.measured, stage.rows, t_floor.seconds,
                    len(mods))  # fmt: skip


def _scoring(stage: _Stages, model, task, mods, ek, size: Size, device: torch.device,
             progress: bool, fl: dict, rate: float, low_plan) -> None:  # fmt: skip
    """Pairwise multi-stage scoring, full-rank queries and rank-r queries preconditioned layer
    by layer (truncated to rank r as it goes)."""
    cands = [b.to(device) for b in _batches(size, size.n_candidates, size.seq_len, 1)]
    queries = _batches(replace(size, batch_size=size.n_queries), size.n_queries,
                       size.query_len, 2)[0].to(device)  # fmt: skip
    ihvp = MultiStageIHVP.from_factors(copy.deepcopy(ek), ek, MultiStageConfig(alpha=1.0))

    def score(cs):
        qg = query_gradients(model, task, queries, mods)
        return pairwise_scores(model, task, qg, cs, ihvp, mods, progress=progress)

    c_tokens = size.n_candidates * size.seq_len
    stage("scoring", lambda: score(cands), lambda: score(cands[:2]), held=2 * nbytes(ek),
          pred_s=(fl["candidate"] + size.n_queries * fl["per_query_candidate"]) * c_tokens / rate)
    rank = min(LOW_RANK, size.hidden)

    def score_low(cs):
        return pairwise_scores(model, task, queries, cs, ihvp, mods, progress=progress, rank=rank)

    stage.predicted[f"scoring (rank {rank})"] = low_plan.peak["scoring"]
    stage(f"scoring (rank {rank})", lambda: score_low(cands), lambda: score_low(cands[:2]),
          held=2 * nbytes(ek), pred_s=fl["candidate"] * c_tokens / rate)


def _payload(size: Size, device: torch.device, tokens: int, measured: dict, rows: list,
             floor_s: float, n_layers: int) -> dict:  # fmt: skip
    """The JSON payload of one run: fitting time and peak over the three fitting stages."""
    cpu = device.type == "cpu"
    fitting = ("covariance", "eigendecomposition", "lambda")
    fit_s = sum(measured[s][0] for s in fitting)
    peak = max(measured[s][1] for s in fitting)
    return {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if not cpu else ""),
        "gpu": not cpu, "size": asdict(size), "fit_tokens": tokens, "fit_s": fit_s,
        "peak_mem_gib": peak / GiB, "scoring_peak_mem_gib": measured["scoring"][1] / GiB,
        "scoring_lowrank_peak_mem_gib": next(v[1] for k, v in measured.items()
                                             if k.startswith("scoring (rank")) / GiB,
        "floor_s": floor_s, "stages": rows,
        "tracked_layers": n_layers,
        "memory_measured_by": "torch.cuda.max_memory_allocated" if not cpu else
        "torch.profiler CPU allocator total, 2-batch run (+ factors held)",
        "targets": {"fit_s": 300, "peak_mem_gib": 24, "apply_to": "full size on one H200"},
        "note": "" if not cpu else "no GPU in this run: reduced size on CPU; run "
        "`msif-lite bench bloom560m` on a GPU machine for the full BLOOM-560m shape",
    }


def main(argv: Sequence[str] | None = None) -> BenchResult:
    p = argparse.ArgumentParser(prog="msif-lite bench bloom560m",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("auto", *SIZES), default="auto",
                   help="full: the BLOOM-560m shape (default on a GPU); reduced: the CPU "
                        "default; tiny: a seconds-long smoke test of the same script")
    p.add_argument("--out", default="results", help="results directory")
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(1)  # a shared 2-core machine: no OpenMP oversubscription
    size = SIZES.get(a.size, FULL if dev.type == "cuda" else REDUCED)
    t0 = time.perf_counter()
    res = run(size, dev, a.progress)
    res["total_s"] = time.perf_counter() - t0
    md = (f"# BLOOM-560m benchmark — {size.name}\n\nDevice: {res['device']}. "
          f"{res['tracked_layers']} tracked linear layers, {res['fit_tokens']:,} fit tokens, "
          f"fit_s (all factor stages) = {res['fit_s']:.1f} s, fitting peak = "
          f"{res['peak_mem_gib']:.3f} GiB, scoring peak = {res['scoring_peak_mem_gib']:.3f} GiB "
          f"(above the weights). {res['note']}\n\n"
          + markdown_table(res["stages"], ["stage", "predicted_s", "measured_s",
                                           "predicted_gib", "measured_gib"]))  # fmt: skip
    return finish("bloom560m", res, md, a.out)


BENCH = Benchmark("bloom560m", "BLOOM-560m-shaped fitting and scoring: time and memory, "
                  "predicted vs measured", main)

"""Exp 1 on the paper's toy shape (GPT-NeoX, 2 layers, hidden 256) with G over the whole
pre-training corpus of the default world (1,004 documents, ~19k tokens), on one CUDA GPU.

    msif-lite bench accuracy-gpu            # on a GPU: < 10 min, writes results/accuracy_gpu/
    msif-lite bench accuracy-gpu --tiny     # CPU smoke test of the same code path (~1 min)

The same `msif-lite bench accuracy-trend` machinery (msif_lite/bench/accuracy_trend.py) as
the CPU trend (G and every approximation on the same documents, λ = 0.1·trace(G)/P, a CG
ground truth with float32 products, float64 recurrences and a float64 residual check), on the
whole corpus. Estimated cost: ~3 TFLOP per batched G·v (10 queries × 19k tokens × 1.6M
parameters), a few tenths of a second on an H200, and ~1,500-2,000 of them at κ ≈ 1e5 (not
run: no GPU was lent to the session that wrote this). The paper-toy pipeline is trained once
into .cache/trained/paper-toy if absent (on the GPU, about a minute). The results name the
device (environment.device in the JSON).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from msif_lite.bench import accuracy_trend
from msif_lite.bench.common import Benchmark, BenchResult

GPU = ["--preset", "paper-toy", "--sizes", "0", "--sweep", "--damping-rel", "0.1",
       "--runs", "runs/accuracy_gpu", "--out", "results/accuracy_gpu", "--threads", "4", "--",
       "--device", "cuda", "--max-iter", "3000", "--tol", "1e-5", "--converged-below", "1e-5",
       "--lissa", "25", "100", "--candidates", "500", "--label-draws", "4", "16"]  # fmt: skip
TINY = ["--preset", "default", "--sizes", "16", "--sweep", "--damping-rel", "5",
        "--runs", "runs/accuracy_gpu_tiny", "--out", "runs/accuracy_gpu_tiny", "--",
        "--device", "cpu", "--queries", "2", "--candidates", "20", "--cg", "2", "4",
        "--lissa", "3", "6", "--label-draws", "2", "--power-iters", "4", "--probes", "4",
        "--max-iter", "400", "--tol", "1e-5", "--converged-below", "1e-5", "--quiet"]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench accuracy-gpu",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of the same code path")
    tiny = ap.parse_args(argv).tiny
    if not tiny and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here: run on a GPU machine, or `--tiny` for the CPU "
                         "smoke test")  # fmt: skip
    return accuracy_trend.main(TINY if tiny else GPU)


BENCH = Benchmark("accuracy-gpu", "Exp 1 on the paper's toy shape with G over the whole corpus, "
                  "on one CUDA GPU (--tiny: CPU smoke test)", main)  # fmt: skip

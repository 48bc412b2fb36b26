"""Data-parallel EK-FAC fit + sharded pairwise scores on a tiny GPT-NeoX (CPU, gloo).

    torchrun --nproc_per_node=2 -m msif_lite.bench.distributed_fit --check   # W processes
    msif-lite bench distributed-fit --check                         # one process (fallback)

Every rank builds the same model and batches (seeded), fits its shard of the batches and
all-reduces the sums; rank 0 prints the stage timings, the (Q, N) score matrix's shape and,
with --check, the largest relative difference from a one-process fit done on rank 0, and
writes <out>/distributed_fit.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from msif_lite.bench.common import Benchmark, BenchResult, finish
from msif_lite.engine.distributed import (
    batch_seed,
    fit_ekfac_distributed,
    pairwise_scores_distributed,
    rank_and_world,
)
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.fit import fit_ekfac
from msif_lite.engine.ihvp import EKFACIHVP
from msif_lite.engine.layers import find_modules
from msif_lite.engine.tasks import LanguageModelingTask, make_token_batch


def tiny_model(seq_len: int):
    """A seeded float64 GPT-NeoX (vocab 512, hidden 64, 2 layers): the same on every rank."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=seq_len, hidden_dropout=0.0,
                        attention_dropout=0.0)  # fmt: skip
    return GPTNeoXForCausalLM(cfg).double().eval()


def markdown(r: dict) -> str:
    check = (f" Largest relative |Λ − Λ_one_process| = {r['max_rel_err_lambda']:.2e}."
             if "max_rel_err_lambda" in r else "")  # fmt: skip
    return (f"# Distributed EK-FAC fit\n\n{r['world']} process(es), {r['n_seq']} sequences × "
            f"{r['seq_len']} tokens, Fisher {r['fisher']}: fit {r['fit_s']:.2f} s (covariances "
            f"{r['covariance_s']:.2f}, eigendecomposition {r['eigendecomposition_s']:.2f}, Λ "
            f"{r['lambda_s']:.2f}); scores {tuple(r['scores_shape'])} in {r['score_s']:.2f} s."
            f"{check}\n")


def main(argv: Sequence[str] | None = None) -> BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench distributed-fit",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--n-seq", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled")
    ap.add_argument("--check", action="store_true", help="compare with a one-process fit")
    ap.add_argument("--out", default="results", help="where distributed_fit.* go (rank 0)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    try:
        rank, world = rank_and_world()
        model = tiny_model(args.seq_len)
        g = torch.Generator().manual_seed(1)
        seqs = torch.randint(3, 512, (args.n_seq, args.seq_len), generator=g).tolist()
        batches = [make_token_batch(seqs[i: i + args.batch_size], pad_id=0)
                   for i in range(0, len(seqs), args.batch_size)]
        task, modules = LanguageModelingTask(), find_modules(model)
        config = FactorConfig(fisher=args.fisher, progress=False)

        t0 = time.perf_counter()
        factors = fit_ekfac_distributed(model, task, batches, config, modules)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = pairwise_scores_distributed(model, task, batches[0].select(slice(0, 4)),
                                             batches, EKFACIHVP(factors), modules,
                                             progress=False)
        score_s = time.perf_counter() - t0
        t = factors.timings
        res = {"world": world, "n_seq": args.n_seq, "seq_len": args.seq_len,
               "batch_size": args.batch_size, "fisher": args.fisher, "fit_s": fit_s,
               "covariance_s": t.covariance_s, "eigendecomposition_s": t.eigendecomposition_s,
               "lambda_s": t.lambda_s, "score_s": score_s,
               "scores_shape": list(scores.shape)}  # fmt: skip
        if args.check and rank == 0:
            seeds = [batch_seed(config.seed, i) for i in range(len(batches))]
            ref = fit_ekfac(model, task, batches, config, modules, batch_seeds=seeds)
            res["max_rel_err_lambda"] = max(float((a.lam - b.lam).abs().max() / b.lam.abs().max())
                                            for a, b in zip(factors.layers, ref.layers))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return BenchResult("distributed_fit", None, None, res)
    return finish("distributed_fit", res, markdown(res), args.out)


BENCH = Benchmark("distributed-fit", "data-parallel EK-FAC fit and sharded scores on a tiny "
                  "GPT-NeoX (under torchrun: -m msif_lite.bench.distributed_fit)", main)

if __name__ == "__main__":  # torchrun --nproc_per_node=W -m msif_lite.bench.distributed_fit
    main(sys.argv[1:])

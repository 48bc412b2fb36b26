"""Data-parallel EK-FAC fit + sharded pairwise scores on a tiny GPT-NeoX (CPU, gloo).

    torchrun --nproc_per_node=2 benchmarks/distributed_fit.py     # W processes
    python benchmarks/distributed_fit.py                            # one process (fallback)

Every rank builds the same model and batches (seeded), fits its shard of the batches and
all-reduces the sums; rank 0 prints the stage timings, the (Q, N) score matrix's shape and,
with --check, the largest relative difference from a one-process fit done on rank 0.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from msif_lite.engine.distributed import (  # noqa: E402
    batch_seed,
    fit_ekfac_distributed,
    pairwise_scores_distributed,
    rank_and_world,
)
from msif_lite.engine.factors import FactorConfig  # noqa: E402
from msif_lite.engine.fit import fit_ekfac  # noqa: E402
from msif_lite.engine.ihvp import EKFACIHVP  # noqa: E402
from msif_lite.engine.layers import find_modules  # noqa: E402
from msif_lite.engine.tasks import LanguageModelingTask, make_token_batch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-seq", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--fisher", choices=("sampled", "empirical"), default="sampled")
    ap.add_argument("--check", action="store_true", help="compare with a one-process fit")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    try:
        rank, world = rank_and_world()
        torch.manual_seed(0)
        cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=256,
                            max_position_embeddings=args.seq_len, hidden_dropout=0.0,
                            attention_dropout=0.0)
        model = GPTNeoXForCausalLM(cfg).double().eval()
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
        if rank == 0:
            t = factors.timings
            print(f"world={world} fit={fit_s:.2f}s (cov {t.covariance_s:.2f}, eigh "
                  f"{t.eigendecomposition_s:.2f}, lambda {t.lambda_s:.2f}) "
                  f"scores{tuple(scores.shape)}={score_s:.2f}s")
        if args.check and rank == 0:
            seeds = [batch_seed(config.seed, i) for i in range(len(batches))]
            ref = fit_ekfac(model, task, batches, config, modules, batch_seeds=seeds)
            err = max(float((a.lam - b.lam).abs().max() / b.lam.abs().max())
                      for a, b in zip(factors.layers, ref.layers))
            print(f"max relative |Λ - Λ_one_process| = {err:.2e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

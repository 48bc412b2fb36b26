"""Recall of the true sources among the top-k retrieved candidates (Notebook 08).

Influence can only rank what candidate selection lets through, so this measures, on the
world's pre-training-only queries, the fraction of each query's true source documents found
in the top-k documents of all-MiniLM-L6-v2 (faiss) and of BM25, for k in {10, 50, 100, 500},
querying with the question alone and with the question plus its answer.

    msif-lite bench retrieval [--preset default] [--out results]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from msif_lite.attribution.retrieval import KS, plot_recall_curve, recall_curves
from msif_lite.bench.common import Benchmark, BenchResult, Timer, finish, markdown_table
from msif_lite.config import fast_mode
from msif_lite.world.generate import load_world


def main(argv: Sequence[str] | None = None) -> BenchResult:
    p = argparse.ArgumentParser(prog="msif-lite bench retrieval", description=__doc__)
    p.add_argument("--preset", default="ci-fast" if fast_mode() else "default")
    p.add_argument("--world", help="world directory (default data/world/<preset>)")
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
    from msif_lite.world.shipped import data_dir

    world = load_world(a.world or data_dir() / "world" / a.preset)
    with Timer() as t:
        curves = recall_curves(world)
    rows = [{"method": m, **{f"recall@{k}": r[k] for k in KS}} for m, r in curves.items()]
    md = (
        f"# Recall of true sources among retrieved candidates ({world.preset} world, "
        f"{len(world.queries)} queries, {len(world.documents)} documents)\n\n"
        + markdown_table(rows, ["method"] + [f"recall@{k}" for k in KS])
    )
    payload = {"preset": world.preset, "n_queries": len(world.queries),
               "n_documents": len(world.documents), "ks": list(KS),
               "recall": {m: {str(k): v for k, v in r.items()} for m, r in curves.items()},
               "seconds": t.seconds}  # fmt: skip
    result = finish("retrieval_recall", payload, md, a.out)
    fig = plot_recall_curve(curves)
    fig.savefig(result.json_path.with_suffix(".png"), dpi=110, bbox_inches="tight")
    return result


BENCH = Benchmark("retrieval", "recall of true sources among the top-k retrieved candidates",
                  main)

"""`msif-lite`: the kit's command line.

    msif-lite trace "Where was Ludrur Draethund born?"     # the main job
    msif-lite trace "..." --json --method single_stage -k 5
    msif-lite bench engine | accuracy | fact-tracing | retrieval | bloom560m | lds | variants
    msif-lite methods                                       # the registered methods
    msif-lite world --preset ci-fast --out runs/ci-fast     # generate, tokenize, train

Offline by default: nothing is fetched from a model hub.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from msif_lite.attribution.methods import METHODS, describe_methods
from msif_lite.engine.curvature import CURVATURES

BENCHES = {
    "engine": "msif_lite.bench.engine",
    "accuracy": "msif_lite.bench.accuracy",
    "fact-tracing": "msif_lite.bench.fact_tracing",
    "retrieval": "msif_lite.bench.retrieval",
    "bloom560m": "msif_lite.bench.bloom560m",
    "lds": "msif_lite.bench.lds",
    "variants": "msif_lite.bench.variants",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msif-lite", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("trace", help="attribute the fine-tuned model's answer to documents")
    t.add_argument("question", help="a question, e.g. 'Where was Ludrur Draethund born?'")
    t.add_argument("--answer", help="attribute this answer instead of the model's own")
    t.add_argument("-k", type=int, default=10, help="documents to print (default 10)")
    t.add_argument("--candidates", type=int, default=100,
                   help="documents pre-selected by embedding similarity (default 100)")
    t.add_argument("--method", default="multi_stage", choices=list(METHODS), metavar="METHOD",
                   help="a registered method (default multi_stage; `msif-lite methods` "
                        f"lists them): {', '.join(METHODS)}")  # fmt: skip
    t.add_argument("--curvature", default="ekfac", choices=list(CURVATURES),
                   help="curvature approximation of both stages (default ekfac)")
    t.add_argument("--json", action="store_true", help="print the hits as JSON")
    t.add_argument("--mlp-only", action="store_true", help="track MLP layers only")
    t.add_argument("--preset", default="default", help="shipped world/checkpoints to use")
    t.add_argument("--world", help="world directory (default data/world/<preset>)")
    t.add_argument("--checkpoints", help="directory with pretrained/ and finetuned/")
    t.add_argument("--cache-dir", default=".cache/msif", help="factor/gradient cache")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("methods", help="list the registered attribution methods")

    b = sub.add_parser("bench", help="run a benchmark (writes results/<name>.json and .md)")
    b.add_argument("name", choices=sorted(BENCHES))
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")

    w = sub.add_parser("world", help="generate the world and train both stages")
    w.add_argument("args", nargs=argparse.REMAINDER,
                   help="see python -m msif_lite.world.training -h")
    return p


def _trace(a: argparse.Namespace) -> int:
    from msif_lite.attribution.attributor import AttributionConfig
    from msif_lite.attribution.trace import trace
    from msif_lite.engine.factors import FactorConfig
    from msif_lite.world.shipped import load_shipped

    shipped = load_shipped(a.preset, world_dir=a.world, checkpoint_dir=a.checkpoints)
    cfg = AttributionConfig(factors=FactorConfig(include="mlp" if a.mlp_only else None),
                            curvature=a.curvature, cache_dir=a.cache_dir,
                            progress=not (a.quiet or a.json))  # fmt: skip
    result = trace(shipped, a.question, answer=a.answer, k=a.k, n_candidates=a.candidates,
                   method=a.method, config=cfg)  # fmt: skip
    print(json.dumps(result.as_json(), indent=2) if a.json else result.as_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = _parser()
    a, extra = parser.parse_known_args(argv)
    if extra and a.command not in ("bench", "world"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        a.args = extra + list(a.args)  # `world --preset X`: options before any positional
    try:
        if a.command == "trace":
            return _trace(a)
        if a.command == "methods":
            print(describe_methods())
            return 0
        if a.command == "bench":
            return int(importlib.import_module(BENCHES[a.name]).main(a.args) or 0)
        if a.command == "world":
            from msif_lite.world.training import main as world_main

            world_main(a.args)
            return 0
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:  # user errors: no traceback
        print(f"msif-lite: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())

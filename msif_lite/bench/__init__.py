"""Benchmarks: `msif-lite bench <name> [args]` (`msif-lite bench --help` lists them).

One rule: a benchmark is a module of this package that defines

    BENCH = Benchmark(name="my-bench", help="one line for `msif-lite bench --help`", main=main)

with `main(argv) -> BenchResult` (msif_lite/bench/common.py). `discover` finds every such
module, so a new benchmark is one new file (plus its test). Each writes
`results/<name>.json` and a markdown table `results/<name>.md`, measures its baseline in the
same run, and records time and peak memory. `MSIF_FAST=1` shrinks sizes. Speed is measured
here, never in timed tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache


@cache
def discover() -> dict:
    """{name: Benchmark} of every module of this package that defines `BENCH`, by name."""
    from msif_lite.bench.common import Benchmark

    found: dict[str, Benchmark] = {}
    for info in pkgutil.iter_modules(__path__):
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except ImportError as e:  # name the module: one broken file stops every benchmark
            raise ImportError(f"msif_lite/bench/{info.name}.py does not import: {e}") from e
        bench = getattr(module, "BENCH", None)
        if bench is None:
            continue
        if not isinstance(bench, Benchmark):
            raise TypeError(f"{module.__name__}.BENCH is not a Benchmark")
        if bench.name in found:
            raise ValueError(f"two benchmarks are named {bench.name!r}")
        found[bench.name] = bench
    return dict(sorted(found.items()))

"""Shared benchmark plumbing: the one result type, timing, peak memory, result files.

A benchmark is a module of this package that defines `BENCH = Benchmark(name, help, main)`,
`main(argv) -> BenchResult`; `msif-lite bench <name>` finds it (`msif_lite.bench.discover`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msif_lite.config import MMAP_THRESHOLD, describe_run, fast_mode
from msif_lite.engine.storage import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class BenchResult:
    """What every benchmark's `main` returns: its payload and the files it wrote (None where
    it wrote none, e.g. a non-zero rank of a distributed run)."""

    name: str
    json_path: Path | None
    md_path: Path | None
    data: dict = field(repr=False)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as the CLI sees it: `msif-lite bench <name> [args]` calls `main(args)`."""

    name: str
    help: str
    main: Callable[[Sequence[str] | None], BenchResult] = field(repr=False)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the lifetime maximum
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory of a block: resident-set growth above the level at entry (sampled every
    `interval` s in a thread) on the CPU, `torch.cuda.max_memory_allocated` on a GPU."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_mb())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._start = self._peak = _rss_mb()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_mb())
        self.peak_mb = self._peak - self._start
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._cuda0) / 2**20


class Timer:
    """`with Timer() as t: ...; t.seconds` (synchronises CUDA so GPU time is counted)."""

    def __enter__(self) -> Timer:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0


def display_path(path: str | Path) -> str:
    """A path as it may appear in committed results: relative to the repository (or the
    working directory), never absolute."""
    p = Path(path).resolve()
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        if p.is_relative_to(base):
            return str(p.relative_to(base))
    return p.name


def environment() -> dict:
    """Where a result was measured (goes into every results JSON)."""
    return {
        "device": describe_run(),
        "mode": "fast" if fast_mode() else "full",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def format_mean_std(r: dict, key: str) -> str:
    """'0.123 ± 0.045' from r[key + '_mean'] and r[key + '_std'] (a results-table cell)."""
    return f"{r[key + '_mean']:.3f} ± {r[key + '_std']:.3f}"


def markdown_table(rows: Sequence[dict], columns: Sequence[str], floatfmt: str = ".3g") -> str:
    """A GitHub markdown table of `rows` (dicts) restricted to `columns`."""

    def fmt(v) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n"
                          for r in rows)  # fmt: skip


def write_results(name: str, payload: dict, markdown: str, out_dir: str | Path = "results") -> Path:
    """Atomically write results/<name>.json (payload + environment) and results/<name>.md."""
    out = Path(out_dir)
    atomic_write_json(out / f"{name}.json", {**payload, "environment": environment()})
    atomic_write_text(out / f"{name}.md", markdown)
    return out / f"{name}.json"


def finish(name: str, payload: dict, markdown: str, out_dir: str | Path = "results",
           quiet: bool = False) -> BenchResult:  # fmt: skip
    """`write_results`, print the markdown (unless quiet) and return the BenchResult."""
    path = write_results(name, payload, markdown, out_dir)
    if not quiet:
        print(markdown)
        print(f"wrote {path}")
    return BenchResult(name, path, path.with_suffix(".md"), payload)




def run_row(command: Sequence[str], spec: dict, *, default_malloc: bool = False) -> dict:
    """Run one benchmark row as `python <command> --row <spec as JSON>` in a fresh process
    (one torch thread, offline, MALLOC_MMAP_THRESHOLD_=65536 unless `default_malloc`, so
    resident memory follows the live bytes) and return the JSON its last line prints."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if not default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run([sys.executable, *command, "--row", json.dumps(spec)],
                         capture_output=True, text=True, env=env, check=False)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"row {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bloom560m_config():
    """The BLOOM-560m architecture (config only: no weights, no hub)."""
    from transformers import BloomConfig

    return BloomConfig(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16)

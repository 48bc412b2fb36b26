"""What both sides of a side-by-side benchmark share, in either interpreter (the kit's `.venv`
or a peer library's): the token-blocks file, the model loader, the batching, the resident-
memory measurement, the spec / result files and the description of the process.

One copy serves both: the kit imports it as `msif_lite.bench.peers.peer_io`; a peer script
run as a file (`<peer python> msif_lite/bench/peers/<peer>.py SPEC`) imports it as `peer_io`
(the script's folder is first on sys.path). Module level needs only the standard library;
torch and transformers (which both interpreters have) are imported where used. Never import
the kit from here: the peer's interpreter does not have it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BLOCKS_FORMAT = "msif-lite token blocks v1"


@dataclass(frozen=True)
class Blocks:
    """Equal-length token blocks (every token a target but the first) and where they came
    from; `ids[i]` is block i."""

    ids: list[list[int]]
    pad_id: int
    eos_id: int
    source: dict

    @property
    def tokens(self) -> int:
        return len(self.ids[0])


def write_blocks(path: str | os.PathLike, ids: list[list[int]], *, pad_id: int, eos_id: int,
                 source: dict) -> Path:  # fmt: skip
    """Write token blocks (JSON) for `read_blocks`, on either side."""
    if not ids or len({len(b) for b in ids}) != 1:
        raise ValueError("blocks must be a non-empty list of equal-length token lists")
    p = Path(path)
    p.write_text(json.dumps({"format": BLOCKS_FORMAT, "pad_id": int(pad_id),
                             "eos_id": int(eos_id), "source": source,
                             "ids": [[int(t) for t in b] for b in ids]}))  # fmt: skip
    return p


def read_blocks(path: str | os.PathLike) -> Blocks:
    """The blocks `write_blocks` wrote: what every side fits and scores on."""
    d = json.loads(Path(path).read_text())
    if d.get("format") != BLOCKS_FORMAT:
        raise ValueError(f"{path}: not a token-blocks file ({d.get('format')!r})")
    return Blocks(d["ids"], d["pad_id"], d["eos_id"], d["source"])


def batch_slices(n: int, size: int) -> list[slice]:
    """Blocks [0, size), [size, 2·size), ...: the batches both sides use, in this order."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def load_model(path: str | os.PathLike):
    """`AutoModelForCausalLM.from_pretrained(path, dtype=float32)` in eval mode (both sides)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def warm_up(model, ids: list[list[int]]) -> None:
    """One untimed no-grad forward pass (kernels, lazy initialisation), on both sides."""
    import torch

    with torch.no_grad():
        model(input_ids=torch.tensor(ids, dtype=torch.long))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def rss_peak(fn: Callable[[], object]) -> tuple[int | None, int, object]:
    """(peak resident bytes above those at entry while `fn()` runs, the process's resident
    high-water mark after it, fn's result), measured the same way in both interpreters, as
    `msif_lite.scale.measure.measure_rss_peak` does: free heap returned (malloc_trim), the
    high-water mark reset (`echo 5 > /proc/self/clear_refs`), then VmHWM − VmRSS at entry.
    Where the mark cannot be reset the growth is None and the mark is the process's lifetime
    peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start: int | None = _status_bytes("VmRSS")
    except OSError:
        start = None
    out = fn()
    hwm = _status_bytes("VmHWM")
    return (None if start is None else hwm - start), hwm, out


class Stopwatch:
    """`with Stopwatch() as t: ...; t.seconds` (wall clock)."""

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: str | os.PathLike, data: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def process_info() -> dict:
    """Who measured: pid, torch threads, versions, CPU, load average (both sides)."""
    import torch
    import transformers

    return {"pid": os.getpid(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": cpu_model(), "cores": os.cpu_count(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}  # fmt: skip

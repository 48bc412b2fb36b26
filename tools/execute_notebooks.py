"""Execute notebooks top to bottom in a fresh kernel and store clean outputs.

    python tools/execute_notebooks.py notebooks/03_kfac.ipynb [...]   # full mode (stored)
    MSIF_FAST=1 python tools/execute_notebooks.py --check notebooks/*.ipynb  # fast, not saved
    python tools/execute_notebooks.py --lab             # the lab path, fast then full mode,
                                                        # each from empty caches, one sitting

`--lab` runs the notebooks listed under "lab" in notebooks/run_times.json, in that order,
once per mode (`--modes fast,full` by default): before each mode it moves the notebooks'
caches (notebooks/.cache, notebooks/runs) aside to .cache/aside/<time>/, so every notebook
starts from what a fresh lab machine has plus what the notebooks before it wrote (notebook 08
reuses 07's .cache/msif). Fast-mode runs are never saved (stored outputs are full mode);
full-mode outputs are saved unless --check. Both modes' times land in run_times.json.

Stored outputs must come from a real run and hold no absolute paths, timings or memory
addresses: progress bars (stderr streams with carriage returns / it/s) are dropped, the
repository path is replaced by '<repo>', and widget state is not saved. Run times per
notebook and mode are merged into notebooks/run_times.json and the README's notebook table
(tools/notebook_table.py), with the kernel's peak resident memory in full mode (`peak_mb`:
the larger of the kernel's own and its children's `ru_maxrss`, read by one extra cell run
after the last one and then removed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\r|it/s\]|s/it\]|\d+%\|")
ADDRESS = re.compile(r" at 0x[0-9a-f]{6,}")


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop progress-bar streams; scrub absolute paths and memory addresses."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                if PROGRESS.search(out.get("text", "")):
                    continue
            if out.get("output_type") == "stream":
                out["text"] = ADDRESS.sub("", out["text"].replace(str(REPO), "<repo>"))
            for key, value in out.get("data", {}).items():
                if key.startswith("text/") and isinstance(value, str):
                    out["data"][key] = ADDRESS.sub("", value.replace(str(REPO), "<repo>"))
            kept.append(out)
        cell["outputs"] = kept
        cell.get("metadata", {}).pop("execution", None)
    nb.metadata.pop("widgets", None)
    return nb


PEAK_MARK = "msif-peak-rss-kib="
PEAK_CELL = ("import resource as _r\n"
             f"print('{PEAK_MARK}' + str(max(_r.getrusage(_r.RUSAGE_SELF).ru_maxrss, "
             "_r.getrusage(_r.RUSAGE_CHILDREN).ru_maxrss)))")


def peak_mb(cell: nbformat.NotebookNode) -> float:
    """The peak RSS the measurement cell printed (Linux reports ru_maxrss in KiB), in MB."""
    text = "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream")
    if PEAK_MARK not in text:
        raise RuntimeError(f"the peak-memory cell printed no measurement: {text!r}")
    return int(text.split(PEAK_MARK, 1)[1].split()[0]) * 1024 / 1e6


def execute(path: Path, save: bool, timeout: int) -> tuple[float, float]:
    """Run every cell in a fresh kernel; return (seconds, kernel peak RSS in MB)."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PEAK_CELL))
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    seconds = time.perf_counter() - t0
    peak = peak_mb(nb.cells.pop())
    if save:
        nbformat.write(clean(nb), path)
    return seconds, peak


NOTEBOOKS = REPO / "notebooks"
CACHES = (".cache", "runs")  # relative to notebooks/, where every kernel runs


def lab_notebooks() -> list[Path]:
    """The lab path declared in notebooks/run_times.json ("lab": [names, in order])."""
    times = json.loads((NOTEBOOKS / "run_times.json").read_text())
    lab = times.get("lab")
    if not lab:
        raise SystemExit('notebooks/run_times.json declares no "lab" list of notebooks')
    return [NOTEBOOKS / n for n in lab]


def move_caches_aside(stamp: str) -> list[Path]:
    """Move notebooks/.cache and notebooks/runs to .cache/aside/<stamp>/ (git-ignored);
    return where they went (nothing is deleted)."""
    moved = []
    for name in CACHES:
        src = NOTEBOOKS / name
        if src.exists():
            dst = REPO / ".cache" / "aside" / stamp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            moved.append(dst)
    return moved


def run_lab(modes: list[str], check: bool, timeout: int) -> list[tuple[str, str, float, float]]:
    """Each mode in turn: caches aside, then every lab notebook in order in a fresh kernel."""
    rows = []
    for mode in modes:
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{mode}"
        for d in move_caches_aside(stamp):
            print(f"moved {d.name} aside to {d.relative_to(REPO)}", flush=True)
        os.environ["MSIF_FAST"] = "1" if mode == "fast" else "0"  # the kernels inherit it
        for path in lab_notebooks():
            s, peak = execute(path, save=mode == "full" and not check, timeout=timeout)
            print(f"{path.name}: {mode} mode, {s:.0f} s, peak {peak:.0f} MB", flush=True)
            record_time(path.name, mode, s, peak if mode == "full" else None)
            rows.append((path.name, mode, s, peak))
    for mode in modes:
        total = sum(s for _, m, s, _ in rows if m == mode)
        peak = max(p for _, m, _, p in rows if m == mode)
        print(f"lab path, {mode} mode, from empty caches: {total / 60:.1f} min, "
              f"largest peak {peak:.0f} MB")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", type=Path)
    p.add_argument("--check", action="store_true", help="execute only; do not save outputs")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--lab", action="store_true",
                   help="run the lab path of run_times.json from empty caches, once per mode")
    p.add_argument("--modes", default="fast,full",
                   help="with --lab: modes to run, in order (fast, full or both)")
    a = p.parse_args(argv)
    if a.lab:
        if a.notebooks:
            p.error("--lab runs the lab path of notebooks/run_times.json: name no notebooks")
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        if not modes or set(modes) - {"fast", "full"}:
            p.error(f"--modes takes fast, full or both, got {a.modes!r}")
        run_lab(modes, a.check, a.timeout)
        return 0
    if not a.notebooks:
        p.error("name the notebooks to run, or pass --lab")
    mode = "fast" if os.environ.get("MSIF_FAST", "0") not in ("", "0") else "full"
    for path in a.notebooks:
        s, peak = execute(path, save=not a.check, timeout=a.timeout)
        print(f"{path.name}: {mode} mode, {s:.0f} s, peak {peak:.0f} MB", flush=True)
        record_time(path.name, mode, s, peak if mode == "full" else None)
    return 0


def record_time(name: str, mode: str, seconds: float, peak: float | None = None) -> None:
    """Merge one run time (and, in full mode, the peak memory in MB) into
    notebooks/run_times.json, re-reading it just before writing (other notebooks may have
    been executed meanwhile); every other key, the "lab" list included, is kept."""
    times_path = REPO / "notebooks" / "run_times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    entry = times.setdefault(name, {})
    entry[mode] = round(seconds)
    if peak is not None:
        entry["peak_mb"] = round(peak)
    entry.setdefault("peak_mb", None)
    tmp = times_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(sorted(times.items())), indent=2) + "\n")
    os.replace(tmp, times_path)
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    from notebook_table import update_readme  # the README's notebook table shows these numbers

    update_readme(REPO / "README.md", times_path)


if __name__ == "__main__":
    sys.exit(main())

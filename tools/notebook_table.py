"""Fill the README's notebook table from notebooks/run_times.json.

    python tools/notebook_table.py          # rewrite the measured columns in README.md
    python tools/notebook_table.py --check  # exit 1 if README.md disagrees with the JSON

The table under "## The notebooks" has one row per notebook:
`| name | what it teaches | full mode | fast mode (CI) | peak memory (full) |`. The last three
columns come from `tools/execute_notebooks.py`'s measurements (run time in each mode and
the kernel's peak resident memory in full mode), which calls `update_readme` after each
notebook; the first two columns are left as written.

The lab path (the notebooks a 2-hour lab runs, in order) is declared once, as the list under
the key "lab" in notebooks/run_times.json; the README's lab row (`| **lab: 00–09** | …`) sums
those notebooks, the whole-series row every notebook.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(\d\d_\w+)` \| (.*?) \|(?: [^|]* \|){2,3}$")
TOTAL = "| **whole series** |"
LAB = "| **lab"  # the lab row starts so; its label names the lab's notebooks (lab_label)
LAB_KEY = "lab"  # run_times.json: the list of notebooks on the lab path, in order
HEADER = ("| notebook | what it teaches | full mode | fast mode (CI) | peak memory (full) |\n"
          "| --- | --- | --- | --- | --- |")


def seconds(s: float | None) -> str:
    """'42 s' below 100 s, else minutes with one decimal; 'not measured' for None."""
    if s is None:
        return "not measured"
    return f"{s:.0f} s" if s < 100 else f"{s / 60:.1f} min"


def megabytes(mb: float | None) -> str:
    return "not measured" if mb is None else f"{mb:,.0f} MB"


def notebook_times(times: dict) -> dict:
    """The per-notebook entries of run_times.json (every key but the lab list)."""
    return {k: v for k, v in times.items() if k != LAB_KEY}


def lab_path(times: dict) -> list[str]:
    """The lab path declared in run_times.json: notebook file names, in order."""
    lab = times.get(LAB_KEY)
    if not isinstance(lab, list) or not lab:
        raise ValueError(f'notebooks/run_times.json has no "{LAB_KEY}" list of notebook names')
    missing = [n for n in lab if n not in times]
    if missing:
        raise ValueError(f"the lab path names notebooks with no run-time entry: {missing}")
    return lab


def lab_label(lab: list[str]) -> str:
    """'| **lab: 00–09** |' for a run of consecutive numbers, else the numbers listed."""
    nums = [n[:2] for n in lab]
    run = [f"{int(nums[0]) + i:02d}" for i in range(len(nums))]
    names = f"{nums[0]}–{nums[-1]}" if nums == run and len(nums) > 1 else ", ".join(nums)
    return f"| **lab: {names}** |"


def total_row(times: dict, label: str = TOTAL, names: list[str] | None = None) -> str:
    """Sum of the run times per mode and the largest peak over the notebooks `names` (all
    by default), saying how many were not measured."""
    def cell(values, fmt, agg) -> str:
        known = [v for v in values if v is not None]
        if not known:
            return "not measured"
        missing = len(values) - len(known)
        return fmt(agg(known)) + (f" ({missing} not measured)" if missing else "")

    nb = notebook_times(times)
    entries = [nb[k] for k in (sorted(nb) if names is None else names)]
    return (f"{label} {len(entries)} notebooks, run one after the other | "
            f"{cell([e.get('full') for e in entries], seconds, sum)} | "
            f"{cell([e.get('fast') for e in entries], seconds, sum)} | "
            f"max {cell([e.get('peak_mb') for e in entries], megabytes, max)} |")


def render(readme: str, times: dict) -> str:
    """README text with the measured columns of every notebook row replaced."""
    lines, out, seen, inside = readme.splitlines(), [], False, False
    for line in lines:
        if line.startswith("## "):
            inside = line.strip() == "## The notebooks"
        m = ROW.match(line) if inside else None
        if inside and line.startswith("| notebook | what it teaches |"):
            out.append(HEADER.splitlines()[0])
            continue
        if inside and line.startswith("| --- |") and out and out[-1] == HEADER.splitlines()[0]:
            out.append(HEADER.splitlines()[1])
            continue
        if inside and line.startswith(TOTAL):
            line = total_row(times)
        if inside and line.startswith(LAB):
            lab = lab_path(times)
            line = total_row(times, lab_label(lab), lab)
        if m:
            seen = True
            t = times.get(f"{m.group(1)}.ipynb", {})
            line = (f"| `{m.group(1)}` | {m.group(2)} | {seconds(t.get('full'))} | "
                    f"{seconds(t.get('fast'))} | {megabytes(t.get('peak_mb'))} |")
        out.append(line)
    if not seen:
        raise ValueError("README.md has no notebook rows (| `NN_name` | … |) to fill")
    return "\n".join(out) + ("\n" if readme.endswith("\n") else "")


def update_readme(readme: Path = REPO / "README.md",
                  times_path: Path = REPO / "notebooks" / "run_times.json") -> bool:
    """Rewrite the table in place from the JSON; True if the README changed."""
    old = readme.read_text()
    new = render(old, json.loads(times_path.read_text()))
    if new != old:
        readme.write_text(new)
    return new != old


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    a = p.parse_args(argv)
    readme = REPO / "README.md"
    if a.check:
        times = json.loads((REPO / "notebooks" / "run_times.json").read_text())
        same = render(readme.read_text(), times) == readme.read_text()
        print("README notebook table matches notebooks/run_times.json" if same else
              "README notebook table differs from notebooks/run_times.json: "
              "run python tools/notebook_table.py")
        return 0 if same else 1
    update_readme(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())

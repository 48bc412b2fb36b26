"""Write the student edition of the series: every notebook without its solution cells.

    python tools/make_student.py            # → student/ (git-ignored), next to notebooks/
    python tools/make_student.py --out DIR

A solution cell is a code cell tagged "solution" (its source starts with "# Solution"; the
tests check the two go together). In the copy each one is replaced by an empty exercise cell
— no source, no outputs — so the exercise text above it is followed by a place to answer.
Every other cell, with its stored outputs, is copied as it is. The copy sits next to
notebooks/ by default so that the relative paths the notebooks use (`../results/…`) still
resolve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
ANSWER = "# Your answer (the solution is in the instructor's copy, notebooks/)\n"


def is_solution(cell: nbformat.NotebookNode) -> bool:
    """Tagged "solution" or starting with "# Solution": either marks a solution cell."""
    tagged = "solution" in cell.get("metadata", {}).get("tags", [])
    return cell.cell_type == "code" and (tagged or cell.source.lstrip().startswith("# Solution"))


def student_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook with each solution cell replaced by an empty answer cell."""
    out = nbformat.from_dict(nb)
    out.cells = [nbformat.v4.new_code_cell(ANSWER) if is_solution(c) else c for c in out.cells]
    return out


def write_student(src: Path, out: Path) -> list[Path]:
    """Write the student copy of every numbered notebook in src to out; return the paths."""
    notebooks = sorted(src.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no numbered notebooks (NN_name.ipynb) in {src}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = student_copy(nbformat.read(path, as_version=4))
        nbformat.write(nb, out / path.name)
        written.append(out / path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, default=REPO / "notebooks")
    p.add_argument("--out", type=Path, default=REPO / "student")
    a = p.parse_args(argv)
    written = write_student(a.src, a.out)
    print(f"wrote {len(written)} student notebooks (no solution cells) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

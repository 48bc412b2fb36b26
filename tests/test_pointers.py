"""Every pointer from the library to the notebooks or the design notes resolves: each
"Notebook NN §Heading" names a heading of notebook NN, each "design.md §Heading" a heading
of docs/design.md, and no docstring cites a file that is not in the repository."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POINTER = re.compile(r"[Nn](?:otebook|B) ?(\d\d)(?:,? (?:§|section )([^\n,;:)\"`]+))?")
DESIGN = re.compile(r"design\.md §([^\n,;:)\"`]+)")


def _headings(md_lines) -> list[str]:
    return [re.sub(r"^#+\s*", "", x).strip().lower() for x in md_lines if x.startswith("#")]


def notebook_headings() -> dict[str, list[str]]:
    out = {}
    for p in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        lines = [ln for c in cells if c["cell_type"] == "markdown"
                 for ln in "".join(c["source"]).splitlines()]  # fmt: skip
        out[p.name[:2]] = _headings(lines)
    return out


def _common(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def resolves(section: str, headings: list[str]) -> bool:
    """True when `section` names a heading: its number ("§4"), the heading's text, or a
    sentence that starts with the heading's text ("§Pairwise scores derives …")."""
    s = section.strip().rstrip(".").lower()
    num = re.match(r"^(\d+)\b", s)
    for h in headings:
        title = re.sub(r"^\d+\s*[.)·]?\s*", "", h)  # "4. Pre-training" → "pre-training"
        number = re.match(r"^(\d+)\s*[.)·]", h)
        if num and number and number.group(1) == num.group(1):
            return True
        k = _common(s, title)
        if len(s) >= 4 and (k == len(s) or k >= min(len(title), 16)):
            return True
    return False


def library_sources() -> list[Path]:
    return sorted((REPO / "msif_lite").rglob("*.py"))


def test_notebook_pointers_resolve():
    heads = notebook_headings()
    bad = []
    for p in library_sources():
        for m in POINTER.finditer(p.read_text()):
            nb, section = m.group(1), m.group(2)
            if nb not in heads:
                bad.append(f"{p.relative_to(REPO)}: notebook {nb} does not exist")
            elif section and not resolves(section, heads[nb]):
                bad.append(f"{p.relative_to(REPO)}: notebook {nb} has no heading {section!r}")
    assert not bad, "\n".join(bad)


def test_design_pointers_resolve_and_no_missing_files():
    design = REPO / "docs" / "design.md"
    heads = _headings(design.read_text().splitlines())
    bad = []
    for p in library_sources():
        text = p.read_text()
        if "DESIGN.md" in text:
            bad.append(f"{p.relative_to(REPO)} cites DESIGN.md (not in the repository)")
        for m in DESIGN.finditer(text):
            if not resolves(m.group(1), heads):
                bad.append(f"{p.relative_to(REPO)}: docs/design.md has no heading {m.group(1)!r}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("section,ok", [("4", True), ("Pre-training", True), ("nosuch", False),
                                        ("5 trains it", False),
                                        ("Pre-training on the corpus derives", True)])
def test_resolver_can_fail(section, ok):
    assert resolves(section, ["4. pre-training on the corpus", "intro"]) is ok

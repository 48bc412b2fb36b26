"""One notation across the series (issue 26): the table in docs/notation.md and notebook 00
agree, and no notebook's text gives a symbol the table reserves another meaning.

The patterns below are the drift the issue found (λ as the L2 strength, ρ as a stationarity
ratio, R as a regulariser or a set, J as an objective or an iteration count, P as the
preconditioned query or a probability, Q as a count, `I` as the influence score, A ⊗ S,
"ci-fast" as a model, BM25 without its input). A reserved symbol may be *used* freely; what
fails is a sentence that defines or uses it as something else.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NOTATION = REPO / "docs" / "notation.md"

# symbol -> (what the table reserves it for, patterns that give it another meaning)
REDEFINITIONS: dict[str, tuple[str, list[str]]] = {
    "λ": ("damping only (wd / μ_L2 is the L2 strength)", [
        r"L2 (?:strength |penalty |term |regularisation |regularization )?(?:of )?λ",
        r"λ(?:_pt)?\s*(?:is|=|:)\s*(?:the\s+)?(?:L2|weight decay)",
        r"weight decay\s*(?:\(|of\s+)?λ",
        r"λ_(?:L2|wd|reg)\b",
        r"(?:K-FAC|Kronecker|EK-FAC)(?:'s)? eigenvalues?\s*(?:\(|are\s+|=\s*)?λ",
        r"eigenvalues?\s+λ_?[ASi]\b",
        r"λ_[AS]\b",  # the Kronecker factors' eigenvalues are d_A, d_S
    ]),
    "ρ": ("Spearman correlation only (the stationarity ratio is r_stat)", [
        r"ρ(?:_\w+)?\s*[:=]\s*(?!\s*Spearman|\s*[-−]?\d)[^\s]",
        r"stationarity ratio\s*ρ",
        r"ρ_stat",
        r"ρ\s+(?:is|measures)\s+(?:the\s+)?(?!Spearman)",
    ]),
    "R": ("the training objective only", [
        r"regulari[sz]er\s+R\b",
        r"\bR\(θ\)\s*=\s*\(?\s*[αλμ]\s*/\s*2",  # R as the penalty term alone
        r"\b(?:a |the |removal )?set R\b",
        r"∈\s*R\b(?![(^])",  # (R^N is the reals)
        r"\bR\s+(?:documents|subsets?)\b",
    ]),
    "J": ("the Jacobian only (objectives are R)", [
        r"\bJ\(θ",
        r"objective\s+J\b",
        r"\^J\b|\^\{J\}",
        r"_J\b",
        r"\bJ\s+(?:iterations|steps)\b",
    ]),
    "P": ("the number of parameters only", [
        r"\bP\s*=\s*\(\s*[HG]",
        r"P\s*∇\s*m",
        r"\bP_(?:l|q|\{)",
        r"\bP\s+is\s+the\s+precondition",
        r"(?<![\w/])P\((?!θ)",  # P(…): a probability or a function, not a count
    ]),
    "Q": ("an eigenbasis only (counts are n_q or N)", [
        r"\bQ\s*=\s*\d",
        r"\b\d[\d,]*\s+Q\b",
        r"\bQ\s+(?:queries|questions)\b",
        r"\(\s*Q\s*,\s*N\s*\)",
        r"\bQ\s*×\s*N\b",
    ]),
    "I": ("the identity matrix only (influence is 𝓘 or `score`)", [
        r"`I`\s+is\s+the\s+influence",
        r"(?<!\\mathcal )(?<!\\mathcal\{)(?<![\w\\])I\((?:z|q)\b",
        r"(?<![\w\\])I_(?:t|ms|q|z|single|dot|rand)\b",
        r"\binfluence (?:score |vector )?I\b(?![(_])",
    ]),
    "⊗": ("K-FAC's order S ⊗ A (row-major vec(DW): kron(S, A))", [
        r"(?<![\w(])A\s*⊗\s*S\b",
        r"Q_A\s*⊗\s*Q_S",
        r"d_A\s*⊗\s*d_S",
        r"kron\(\s*A\s*,\s*S\s*\)",
        r"(?<![\w(])A\s*\\otimes\s*S\b",
    ]),
    "ci-fast": ("the small world preset only", [
        r"ci-fast`?\s+(?:GPT|model|pipeline|network|transformer)",
        r"(?:model|pipeline) preset\s+`?ci-fast",
    ]),
}


def table_rows(text: str) -> list[str]:
    """The notation table: the markdown table whose header row starts '| symbol |'."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("| symbol |")), None)
    assert start is not None, "no notation table (a row starting '| symbol |')"
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append(ln.rstrip())
    return rows


def markdown_cells(path: Path) -> list[tuple[int, str]]:
    cells = json.loads(path.read_text())["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "markdown"]


def violations(text: str) -> list[tuple[str, str]]:
    """(symbol, the offending text) for each pattern that matches."""
    out = []
    for sym, (_, pats) in REDEFINITIONS.items():
        for pat in pats:
            for m in re.finditer(pat, text):
                if sym == "ρ" and "Spearman" in text[max(0, m.start() - 20):m.start()]:
                    continue  # "Spearman's ρ = Pearson correlation of the ranks" defines it
                a, b = max(0, m.start() - 30), min(len(text), m.end() + 30)
                out.append((sym, text[a:b].replace("\n", " ")))
    return out


def bm25_without_input(text: str) -> bool:
    """A cell that names BM25 must say which input it was queried with."""
    return "BM25" in text and not re.search(
        r"question \+ answer|question only|question alone|`bm25_question`", text)


def test_notation_table_exists_and_has_the_reserved_symbols():
    rows = table_rows(NOTATION.read_text())
    cols = [re.split(r"(?<!\\)\|", r) for r in rows]  # an escaped \| stays inside its column
    symbols = " ".join(c[1] for c in cols[2:])
    for sym in ("λ", "wd", "Λ", "d_A", "ρ", "r_stat", "R(θ)", "J", "P", "Q_A", "I", "𝓘",
                "S ⊗ A", "α", "θ_pt", "m(q)", "ℓ(z", "G", "H", "p̃", "BM25", "ci-fast"):
        assert sym in symbols, f"docs/notation.md's table has no row for {sym}"
    assert all(len(c) == 5 for c in cols), "rows are | symbol | meaning | where |"


def test_notebook_00_shows_the_same_table():
    nb00 = next(p for p in NOTEBOOKS if p.name.startswith("00_"))
    cells = [t for _, t in markdown_cells(nb00) if "| symbol |" in t]
    assert len(cells) == 1, "notebook 00 has one markdown cell with the notation table"
    assert table_rows(cells[0]) == table_rows(NOTATION.read_text()), \
        "notebook 00's notation table differs from docs/notation.md: copy it over"
    first_md = markdown_cells(nb00)[0][0]
    assert markdown_cells(nb00)[1][1] == cells[0], \
        "the notation table is the markdown cell right after notebook 00's first one"
    assert first_md == 0


def test_the_patterns_catch_the_drift_the_issue_lists():
    """Sentences of the kind issue 26 found must fail; the table's own usage must pass."""
    bad = ["the L2 strength λ = 1e-2", "pre-trained with L2 λ_pt", "ρ = ‖∇R‖ / Σ‖g‖",
           "the stationarity ratio ρ", "a regulariser R", "removing a set R of documents",
           "J(θ) = L(θ) + R(θ)", "error ∝ (1 − 1/κ)^J", "P = (H + λI)⁻¹∇m", "the query P∇m",
           "Q = 10 queries", "`I` is the influence vector", "the scores I(z, q) > 0",
           "G_l ≈ A ⊗ S", "(Q_A ⊗ Q_S) diag(Λ)", "the `ci-fast` GPT-NeoX",
           "K-FAC eigenvalues λ_S λ_Aᵀ", "S = Q_S diag(λ_S) Q_Sᵀ", "P(first at rank r)",
           "preconditioned query P_l"]
    missed = [s for s in bad if not violations(s)]
    assert not missed, f"patterns miss: {missed}"
    good = ["(G + λI)⁻¹", "λ_pt = wd is exact", "Spearman ρ 0.756", "ρ = 0.15", "ρ: Spearman",
            "R(θ) = (1/N) Σ ℓ(z, θ) + (wd/2)‖θ‖²", "∇R(θ) = 0", "Jacobian J = ∂f/∂θ", "Jᵀ H_f J",
            "P = 180 parameters", "tr(G)/P", "Q = Q_S ⊗ Q_A", "G_l ≈ S ⊗ A", "kron(S, A)",
            r"\mathcal I(z, q)", "𝓘(z, q) > 0", "(H + μ_L2 I)⁻¹", "the `ci-fast` world",
            "(A⊗B)(C⊗D) = AC⊗BD", "Σ_{z∈S_j} 𝓘(z, q)", "Spearman's ρ = Pearson of the ranks",
            "weights w ∈ R^N"]
    wrong = [(s, violations(s)) for s in good if violations(s)]
    assert not wrong, f"patterns flag correct usage: {wrong}"
    assert bm25_without_input("BM25 wins")
    assert not bm25_without_input("BM25 (question + answer) wins")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_redefines_a_reserved_symbol(path: Path):
    found = [(i, sym, text) for i, t in markdown_cells(path)
             if not t.lstrip().startswith("### Notation") for sym, text in violations(t)]
    msg = "; ".join(f"cell {i}: {sym} ({REDEFINITIONS[sym][0]}): …{text}…"
                    for i, sym, text in found)
    assert not found, f"{path.name}: {msg}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_bm25_says_which_input(path: Path):
    bare = [i for i, t in markdown_cells(path) if bm25_without_input(t)]
    assert not bare, f"{path.name}: cells {bare} name BM25 without its input " \
                     "(BM25 (question + answer) or BM25 (question only))"


def _prose_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += sorted((REPO / "msif_lite").rglob("*.py"))
    return [p for p in files if p != NOTATION]


def test_one_kronecker_order_everywhere():
    """README, docs, docstrings and comments write the K-FAC block in the code's order."""
    pats = REDEFINITIONS["⊗"][1]
    found = [f"{p.relative_to(REPO)}:{n}: {ln.strip()}" for p in _prose_files()
             for n, ln in enumerate(p.read_text().splitlines(), 1)
             if any(re.search(pat, ln) for pat in pats)]
    assert not found, "A ⊗ S order (the code computes kron(S, A)):\n" + "\n".join(found)

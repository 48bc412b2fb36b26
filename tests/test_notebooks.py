"""Static checks of the committed notebooks (CI also executes them with nbval)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
ABSOLUTE_PATH = re.compile(r"(?<![:/\w<])/(?:[\w.-]+/){2,}[\w.-]+")
ADDRESS = re.compile(r"0x[0-9a-f]{8,}")


def outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]


def text_of(out: dict) -> str:
    parts = [out.get("text", "")] + [
        v if isinstance(v, str) else "".join(v)
        for k, v in out.get("data", {}).items()
        if k.startswith("text/")
    ]
    return "".join(p if isinstance(p, str) else "".join(p) for p in parts)


def test_there_are_notebooks():
    assert NOTEBOOKS, "no numbered notebooks under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path: Path):
    nb = json.loads(path.read_text())
    assert "kernelspec" in nb["metadata"], "every notebook needs a kernelspec (nbval)"
    outs = outputs(nb)
    errors = [o for o in outs if o.get("output_type") == "error"]
    assert not errors, f"error output stored: {errors[0].get('ename')}"
    text = "\n".join(text_of(o) for o in outs)
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text).group(0)
    assert not ADDRESS.search(text), "memory address in outputs"
    assert outs, "stored outputs must come from a real run"
    assert "device=" in text and "mode=" in text, "say which device and mode produced outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_ends_with_claims(path: Path):
    nb = json.loads(path.read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert any("assert" in c for c in code[-3:]), "end with assertions a learner reads as claims"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solutions_hide_their_source_and_their_outputs(path: Path):
    nb = json.loads(path.read_text())
    sols = [c for c in nb["cells"] if c["cell_type"] == "code"
            and "".join(c["source"]).startswith("# Solution")]  # fmt: skip
    assert sols, "every notebook has exercises with solutions"
    for c in sols:
        j = c.get("metadata", {}).get("jupyter", {})
        assert j.get("source_hidden") and j.get("outputs_hidden"), "a solution shows itself"
        assert "solution" in c["metadata"].get("tags", [])


def test_library_never_switches_the_matplotlib_backend():
    lib = Path(__file__).resolve().parents[1] / "msif_lite"
    offenders = [p.name for p in lib.rglob("*.py") if "matplotlib.use(" in p.read_text()]
    assert not offenders, f"library code switches the backend (figures vanish): {offenders}"


def _tool(name: str):
    """Import a script from tools/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _solution_sources(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"
            and "solution" in c.get("metadata", {}).get("tags", [])]  # fmt: skip


def test_student_edition_has_no_solution_cells(tmp_path: Path):
    written = _tool("make_student").write_student(REPO / "notebooks", tmp_path)
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        nb, st = json.loads(path.read_text()), json.loads((tmp_path / path.name).read_text())
        sols = _solution_sources(nb)
        assert not _solution_sources(st), f"{path.name}: the student copy keeps a solution cell"
        st_code = ["".join(c["source"]) for c in st["cells"] if c["cell_type"] == "code"]
        assert not any(c.lstrip().startswith("# Solution") for c in st_code), path.name
        rest = json.dumps([c for c in nb["cells"] if "".join(c["source"]) not in sols])
        copied = json.dumps(st)
        for c in nb["cells"]:  # neither a solution's source nor its outputs survive anywhere
            if "".join(c["source"]) in sols:
                text = "".join(c["source"][1:]) + "".join(text_of(o) for o in c.get("outputs", []))
                own = [q for q in (json.dumps(ln)[1:-1] for ln in text.splitlines()
                                   if len(ln.strip()) > 20) if q not in rest]
                leaked = [q for q in own if q in copied]
                assert not leaked, f"{path.name}: a solution line survives: {leaked[0]}"
        assert len(st["cells"]) == len(nb["cells"]), "each solution becomes one empty answer cell"
        answers = [c for c in st["cells"] if c["cell_type"] == "code" and not c.get("outputs")
                   and "".join(c["source"]).startswith("# Your answer")]
        assert len(answers) == len(sols), path.name
        kept = [c for c in nb["cells"] if "".join(c["source"]) not in sols]
        assert [c["source"] for c in kept] == [c["source"] for c in st["cells"]
                                               if c not in answers], "other cells are copied as is"


@pytest.mark.slow  # executes a notebook
def test_student_copy_runs_in_fast_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MSIF_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mod = _tool("make_student")
    out = tmp_path / "student"
    mod.write_student(REPO / "notebooks", out)
    nb = nbformat.read(out / "01_influence_functions.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(out)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert any("mode=fast" in o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


DRAWS = re.compile(r"plt\.show\(\)|plt\.subplots\(|plt\.figure\(|"
                   r"\b(?:score_distributions|rank_comparison|layer_contributions|token_heatmap)\(")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_that_draw_show_their_figure(path: Path):
    """A cell that builds a figure stores it as image/png (a library that switched the
    matplotlib backend, or a figure never displayed, leaves the cell without one)."""
    nb = json.loads(path.read_text())
    missing = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
               and DRAWS.search("".join(c["source"]))
               and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not missing, f"cells {missing} draw a figure but store no image/png output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_headers_point_to_the_measured_run_times(path: Path):
    """Run times live in one place (run_times.json and the README table), so no header can
    drift from them."""
    header = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert "**Run time." not in header, "replace the run-time estimate by a pointer to the README"
    quoted = re.findall(r"~\s*\d+(?:\.\d+)?\s*(?:s|min)\b", header)
    assert not quoted, f"{path.name} header quotes run times {quoted}: point to the README table"


def test_readme_notebook_table_shows_the_measured_times_and_memory():
    readme = (REPO / "README.md").read_text()
    times = json.loads((REPO / "notebooks" / "run_times.json").read_text())
    assert set(times) - {"lab"} == {p.name for p in NOTEBOOKS}, \
        "run_times.json has one entry per notebook, plus the lab path under \"lab\""
    assert _tool("notebook_table").render(readme, times) == readme, \
        "README table differs from notebooks/run_times.json: run python tools/notebook_table.py"


def test_readme_lab_row_sums_the_declared_lab_path():
    """The lab row is computed from the "lab" list, not from a hard-coded range."""
    table = _tool("notebook_table")
    times = json.loads((REPO / "notebooks" / "run_times.json").read_text())
    lab = table.lab_path(times)
    row = next(ln for ln in (REPO / "README.md").read_text().splitlines()
               if ln.startswith("| **lab"))
    assert row == table.total_row(times, table.lab_label(lab), lab)
    assert row.startswith(f"| **lab: {lab[0][:2]}–{lab[-1][:2]}** | {len(lab)} notebooks")
    fewer = {**times, "lab": lab[:3]}  # another declared path changes the row
    assert table.render((REPO / "README.md").read_text(), fewer) != (REPO / "README.md").read_text()


def test_recording_a_run_time_keeps_the_lab_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ex = _tool("execute_notebooks")
    (tmp_path / "notebooks").mkdir()
    times = json.loads((REPO / "notebooks" / "run_times.json").read_text())
    (tmp_path / "notebooks" / "run_times.json").write_text(json.dumps(times))
    (tmp_path / "README.md").write_text((REPO / "README.md").read_text())
    monkeypatch.setattr(ex, "REPO", tmp_path)
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    ex.record_time("03_kfac.ipynb", "fast", 12.3)
    after = json.loads((tmp_path / "notebooks" / "run_times.json").read_text())
    assert after["lab"] == times["lab"], "merging a run time dropped or changed the lab path"
    assert after["03_kfac.ipynb"]["fast"] == 12


def test_lab_run_moves_the_caches_aside_and_deletes_nothing(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    ex = _tool("execute_notebooks")
    nbs = tmp_path / "notebooks"
    (nbs / ".cache" / "msif").mkdir(parents=True)
    (nbs / ".cache" / "msif" / "factors.bin").write_text("x")
    (nbs / "runs" / "nb09").mkdir(parents=True)
    monkeypatch.setattr(ex, "REPO", tmp_path)
    monkeypatch.setattr(ex, "NOTEBOOKS", nbs)
    moved = ex.move_caches_aside("t0")
    assert not (nbs / ".cache").exists() and not (nbs / "runs").exists(), "caches left in place"
    aside = tmp_path / ".cache" / "aside" / "t0"
    assert (aside / ".cache" / "msif" / "factors.bin").read_text() == "x", "a cache file was lost"
    assert {p.name for p in moved} == {".cache", "runs"}


# ---------------------------------------------------------------------------------------
# The lab path (issue 26): declared once in notebooks/run_times.json, read by the README's
# lab row, tools/execute_notebooks.py --lab and these tests.

LAB = json.loads((REPO / "notebooks" / "run_times.json").read_text())["lab"]
LAB_NOTEBOOKS = [REPO / "notebooks" / n for n in LAB]
LAB_WORDS = 8000  # the reading budget for the whole lab path
# the per-notebook split agreed for issue 26; 00 also holds the notation table (~200 words)
WORD_BUDGET = {"00": 850, "01": 850, "02": 600, "03": 750, "04": 750, "05": 750, "06": 750,
               "07": 950, "08": 500, "09": 950}
VERDICT = "## The verdict: does influence predict retraining?"
PREDICT_FIRST = "**Predict first:**"
PREDICT_IN = ("01", "07", "09", "10", "11")  # each checks against retraining or an exact reference
LIST_ITEM = re.compile(r"^(?:\d+[.)]|[-*])\s+\S")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _src(cell: dict) -> str:
    return "".join(cell["source"])


def markdown_words(path: Path) -> int:
    """Words of every markdown cell: whitespace-separated tokens holding a letter or digit
    (a table's pipes and rules, a lone '—' or '=' are not words a student reads)."""
    return sum(sum(1 for t in _src(c).split() if re.search(r"\w", t))
               for c in _cells(path) if c["cell_type"] == "markdown")


def _list_after(text: str, heading: re.Pattern) -> list[str] | None:
    """The list items (numbered or bulleted) right after a heading; None without the heading."""
    lines = text.splitlines()
    at = next((i for i, ln in enumerate(lines) if heading.match(ln.strip())), None)
    if at is None:
        return None
    items, started = [], False
    for ln in lines[at + 1:]:
        if ln.lstrip().startswith("#"):
            break
        if LIST_ITEM.match(ln):  # a top-level item (not indented)
            items.append(ln)
            started = True
        elif started and ln.strip() and not ln.startswith((" ", "\t")):
            break  # a paragraph after the list ends it
        elif started and not ln.strip():
            continue
    return items


def test_lab_path_is_declared_in_order_and_ends_with_the_verdict():
    names = [p.name for p in NOTEBOOKS]
    assert LAB and all(n in names for n in LAB), f"the lab path names missing notebooks: {LAB}"
    assert LAB == sorted(LAB), "the lab path runs in notebook order"
    assert any(_src(c).strip().startswith(VERDICT) for c in _cells(LAB_NOTEBOOKS[-1])
               if c["cell_type"] == "markdown"), f"the lab's last notebook has no '{VERDICT}'"


def test_lab_reading_load_fits_the_budget():
    words = {p.name: markdown_words(p) for p in LAB_NOTEBOOKS}
    for name, n in words.items():
        print(f"{name:<36s}{n:>6d} markdown words (budget {WORD_BUDGET.get(name[:2], '-')})")
    print(f"{'lab path':<36s}{sum(words.values()):>6d} (budget {LAB_WORDS})")
    assert sum(words.values()) <= LAB_WORDS, \
        f"the lab path holds {sum(words.values())} markdown words (> {LAB_WORDS}): {words}"


@pytest.mark.parametrize("path", LAB_NOTEBOOKS, ids=lambda p: p.name)
def test_lab_notebook_keeps_its_word_budget(path: Path):
    n, budget = markdown_words(path), WORD_BUDGET[path.name[:2]]
    assert n <= budget, f"{path.name}: {n} markdown words, over its budget of {budget}"


@pytest.mark.parametrize("path", LAB_NOTEBOOKS, ids=lambda p: p.name)
def test_lab_notebook_opens_with_three_learning_goals(path: Path):
    first = next(c for c in _cells(path) if c["cell_type"] == "markdown")
    goals = _list_after(_src(first), re.compile(r"^#{1,6}\s+Learning goals\s*$"))
    assert goals is not None, "the first markdown cell needs a heading 'Learning goals'"
    assert len(goals) == 3, f"3 learning goals under the heading, found {len(goals)}: {goals}"


@pytest.mark.parametrize("path", LAB_NOTEBOOKS, ids=lambda p: p.name)
def test_lab_notebook_ends_with_a_recap_before_its_claims(path: Path):
    cells = _cells(path)
    at = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown"
          and re.search(r"^## Recap\s*$", _src(c), re.M)]  # fmt: skip
    assert len(at) == 1, f"one '## Recap' heading, found {len(at)}"
    bullets = _list_after(_src(cells[at[0]]), re.compile(r"^## Recap\s*$"))
    assert 3 <= len(bullets) <= 5, f"the recap has 3–5 bullets, found {len(bullets)}"
    code_after = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and i > at[0]]
    assert len(code_after) == 1 and code_after[0] == max(
        i for i, c in enumerate(cells) if c["cell_type"] == "code"), \
        "the recap comes just before the final claims cell (no other code cell after it)"


@pytest.mark.parametrize("path", LAB_NOTEBOOKS, ids=lambda p: p.name)
def test_lab_notebook_has_a_pen_and_paper_exercise_with_a_hidden_solution(path: Path):
    cells = _cells(path)
    found = []
    for i, c in enumerate(cells):
        text = _src(c).strip()
        if c["cell_type"] == "markdown" and text.startswith("**Exercise") \
                and "pen and paper" in text.lower():  # fmt: skip
            nxt = next((d for d in cells[i + 1:] if d["cell_type"] == "code"), None)
            found.append(nxt is not None and "solution" in nxt.get("metadata", {}).get("tags", [])
                         and _src(nxt).startswith("# Solution"))
    assert found, "no markdown cell starting '**Exercise' that says 'pen and paper'"
    assert all(found), "a pen-and-paper exercise is not followed by its hidden '# Solution' cell"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name[:2] in PREDICT_IN],
                         ids=lambda p: p.name)
def test_checks_against_retraining_are_predicted_first(path: Path):
    md = [_src(c) for c in _cells(path) if c["cell_type"] == "markdown"]
    assert any(PREDICT_FIRST in t for t in md), (
        f"{path.name} checks against retraining or an exact reference: "
        f"add a '{PREDICT_FIRST}' prompt")


def _draws(cell: dict) -> bool:
    return cell["cell_type"] == "code" and (
        bool(DRAWS.search(_src(cell)))
        or any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])))


@pytest.mark.parametrize("path", LAB_NOTEBOOKS, ids=lambda p: p.name)
def test_every_lab_figure_is_captioned(path: Path):
    """A markdown cell right after each figure says what to see in it."""
    cells = _cells(path)
    bare = [i for i, c in enumerate(cells) if _draws(c)
            and "solution" not in c.get("metadata", {}).get("tags", [])
            and (i + 1 == len(cells) or cells[i + 1]["cell_type"] != "markdown")]
    assert not bare, f"cells {bare} draw a figure with no markdown caption right after"


@pytest.mark.parametrize("path", LAB_NOTEBOOKS, ids=lambda p: p.name)
def test_every_lab_figure_is_titled_and_labelled(path: Path):
    """Figures built in the notebook set a title and label their value axis (a categorical
    axis is labelled by its ticks); library helpers (`plot_recall_curve`, `score_distributions`,
    …) title and label their own axes."""
    own = [(i, _src(c)) for i, c in enumerate(_cells(path)) if _draws(c)
           and re.search(r"plt\.subplots\(|plt\.figure\(|\.add_subplot\(", _src(c))]
    helper = re.compile(r"\b(?:plot_\w+|score_distributions|rank_comparison|layer_contributions|"
                        r"token_heatmap)\(")
    bad = [i for i, s in own if not helper.search(s)
           and ("title" not in s or not re.search(r"[xy]label", s))]
    assert not bad, f"cells {bad} draw a figure without a title or an axis label"


@pytest.mark.slow  # starts two kernels
def test_lab_run_times_both_modes_from_empty_caches(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """`execute_notebooks.py --lab` on a one-notebook lab: each mode starts with the caches
    moved aside, runs the notebook in that mode, saves only the full-mode outputs and records
    both times without losing the lab list."""
    import nbformat

    ex = _tool("execute_notebooks")
    nbs = tmp_path / "notebooks"
    (nbs / ".cache").mkdir(parents=True)
    (nbs / ".cache" / "old").write_text("stale")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, pathlib\nprint('mode=' + os.environ['MSIF_FAST'], "
        "pathlib.Path('.cache/old').exists())\npathlib.Path('.cache').mkdir(exist_ok=True)\n"
        "pathlib.Path('.cache/old').write_text('written by this run')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, nbs / "00_x.ipynb")
    (nbs / "run_times.json").write_text(json.dumps({"00_x.ipynb": {}, "lab": ["00_x.ipynb"]}))
    (tmp_path / "README.md").write_text("## The notebooks\n\n| `00_x` | x | - | - | - |\n")
    monkeypatch.setattr(ex, "REPO", tmp_path)
    monkeypatch.setattr(ex, "NOTEBOOKS", nbs)
    monkeypatch.setenv("MSIF_FAST", "1")
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    ex.run_lab(["fast", "full"], check=False, timeout=120)
    times = json.loads((nbs / "run_times.json").read_text())
    assert times["lab"] == ["00_x.ipynb"], "recording the times dropped the lab list"
    assert {"fast", "full", "peak_mb"} <= set(times["00_x.ipynb"])
    saved = nbformat.read(nbs / "00_x.ipynb", as_version=4).cells[0].outputs
    assert saved and saved[0]["text"].startswith("mode=0 False"), "full mode, from empty caches"
    aside = sorted((tmp_path / ".cache" / "aside").iterdir())
    assert len(aside) == 2 and (aside[0] / ".cache" / "old").read_text() == "stale"

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
    assert set(times) == {p.name for p in NOTEBOOKS}, "run_times.json has one entry per notebook"
    assert _tool("notebook_table").render(readme, times) == readme, \
        "README table differs from notebooks/run_times.json: run python tools/notebook_table.py"

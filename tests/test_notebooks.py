"""Static checks of the committed notebooks (CI also executes them with nbval)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
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

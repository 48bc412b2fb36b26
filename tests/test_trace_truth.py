"""A trace that tells the truth (issue 24): on the kit's world it prints what the kit
measured about the method against retraining, read from results/*.json (never hard-coded);
it says which question template it used, and `--template chat` uses the tokenizer's chat
template while retrieval still matches the bare question."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers_world import build_tiny_shipped
from test_own_model import _tokenizer, save_pair, write_data

from msif_lite.attribution.chat import (
    chat_prompt_template,
    has_chat_template,
    query_text,
    template_note,
)
from msif_lite.attribution.measured import load_measured, measured_lines
from msif_lite.cli import main
from msif_lite.engine.prompts import DEFAULT_TEMPLATE, PromptTemplate

RESULTS = Path(__file__).resolve().parents[1] / "results"
CHAT = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant:\n{% endif %}")  # fmt: skip


def _fake_results(root: Path, ms=(0.1, 0.02), bm25=(0.4, 0.03), tok=(0.5, 0.01)) -> Path:
    """A variants.json with made-up numbers in the benchmark's layout."""
    lds = {"multi_stage": ms, "bm25": bm25, "multi_stage_token_positive": tok,
           "embedding": (0.9, 0.01), "random": (0.0, 0.02)}  # fmt: skip
    removal = {m: {"dm_targets_mean": 10 * v[0], "dm_others_mean": 0.5} for m, v in lds.items()}
    removal["true_sources"] = {"dm_targets_mean": 7.5, "dm_others_mean": 0.25}
    world = {"lds": {m: {"mean": v[0], "sem": v[1]} for m, v in lds.items()},
             "top_k_removal": removal,
             "settings": {"k": 3, "n_documents": 200, "n_queries": 52, "n_subsets": 32}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "variants.json").write_text(json.dumps({"worlds": {
        "lds": world, "ci-fast": {"mrr": {"multi_stage": 0.25, "bm25": 0.75}}}}))
    return root


def test_measured_block_reads_the_numbers_from_the_json(tmp_path):
    root = _fake_results(tmp_path / "results")
    text = "\n".join(measured_lines("multi_stage", root, traced_world="ci-fast",
                                    question="Where was Ada born?"))  # fmt: skip
    assert "0.100 ± 0.020" in text and "0.400 ± 0.030" in text and "0.500 ± 0.010" in text
    assert "multi_stage_token_positive" in text and "the best gradient variant" in text
    assert "embedding" not in text  # a text method is not "the best gradient variant"
    assert "1.00 / 0.50" in text and "7.50 / 0.25" in text  # Δm: method, true sources
    assert "MRR of the true sources: multi_stage 0.250, bm25 0.750" in text
    assert text.rstrip().endswith('msif-lite trace "Where was Ada born?" --compare bm25 '
                                  "(or --compare multi_stage_token_positive)")
    # other numbers in the file → other output: nothing is hard-coded
    other = _fake_results(tmp_path / "other", ms=(0.3, 0.05))
    assert "0.300 ± 0.050" in "\n".join(measured_lines("multi_stage", other))


def test_missing_results_are_said_to_be_missing(tmp_path):
    lines = measured_lines("multi_stage", tmp_path / "nowhere")
    assert len(lines) == 1 and "no retraining results" in lines[0]
    assert load_measured(tmp_path / "nowhere") is None


@pytest.mark.skipif(not (RESULTS / "variants.json").exists(), reason="no shipped results")
def test_the_shipped_results_put_bm25_and_the_token_variant_beside_multi_stage():
    m = load_measured(RESULTS, traced_world="default")
    assert {"multi_stage", "bm25"} <= set(m.lds) and m.best_variant("multi_stage")
    text = "\n".join(measured_lines("multi_stage", RESULTS, traced_world="default"))
    ms, bm = m.lds["multi_stage"], m.lds["bm25"]
    assert f"{ms[0]:.3f} ± {ms[1]:.3f}" in text and f"{bm[0]:.3f} ± {bm[1]:.3f}" in text


def test_cli_trace_on_the_kit_world_prints_what_was_measured(tmp_path, capsys, monkeypatch):
    root = build_tiny_shipped(tmp_path / "shipped")
    results = _fake_results(tmp_path / "results")
    monkeypatch.setattr("msif_lite.attribution.measured.RESULTS_DIR", results)
    args = ["trace", "Where was Ludrur Draethund born?", "--answer", "Narvosk", "-k", "3",
            "--candidates", "1000", "--world", str(root / "world"), "--checkpoints",
            str(root / "ckpt"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "what the kit measured against retraining" in out and "0.100 ± 0.020" in out
    assert '--compare bm25' in out  # the hint to see the other method side by side
    assert "template: the kit's plain QA template (the fine-tune's)" in out
    shutil.rmtree(results)
    assert main(args) == 0
    assert "no retraining results" in capsys.readouterr().out
    assert main(args + ["--template", "chat"]) == 2  # the kit's tokenizer has no chat template
    assert "has no chat template" in capsys.readouterr().err


def test_chat_template_as_prompt_template_and_stripped_for_retrieval():
    tok = _tokenizer(["Where was Ada born? London"])
    assert not has_chat_template(tok)
    assert "no chat template" in template_note(tok, DEFAULT_TEMPLATE)
    tok.chat_template = CHAT
    t = chat_prompt_template(tok)
    assert t == PromptTemplate("### user:\n", "\n### assistant:\n", "")
    prompt = t.as_prompt("Where was Ada born?")
    assert prompt == "### user:\nWhere was Ada born?\n### assistant:\n"
    assert query_text(prompt, "London", t) == "Where was Ada born? London"
    assert query_text(DEFAULT_TEMPLATE.as_prompt("Where was Ada born?")) == "Where was Ada born?"
    note = template_note(tok, DEFAULT_TEMPLATE)
    assert "the kit's plain QA template (the fine-tune's)" in note
    assert "the model's chat template is not used" in note
    assert "the model's chat template (tokenizer.apply_chat_template)" in template_note(tok, t)


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """tests/test_own_model's tiny Llama pair, its tokenizer given a chat template."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    pt, ft = save_pair(root, "llama")
    for d in (pt, ft):
        tok = AutoTokenizer.from_pretrained(d)
        tok.chat_template = CHAT
        tok.save_pretrained(d)
    corpus, data = write_data(root)
    return ["trace", "--pretrained", str(pt), "--finetuned", str(ft), "--corpus", str(corpus),
            "--finetune-data", str(data), "--alpha", "0.01", "--cache-dir",
            str(root / "cache"), "--quiet", "-k", "4", "--answer", "London"]  # fmt: skip


def test_cli_says_which_template_and_retrieval_ignores_the_wrapper(chat_pair, capsys):
    q = "Where was Ada Lovelace born?"
    assert main(chat_pair + [q]) == 0
    out = capsys.readouterr().out
    assert "template: the kit's plain QA template (the fine-tune's)" in out
    assert "the model's chat template is not used (--template chat uses it)" in out
    assert main(chat_pair + ["--template", "chat", q]) == 0
    out = capsys.readouterr().out
    assert "template: the model's chat template (tokenizer.apply_chat_template)" in out
    # BM25 sees the bare question under either template: the same ranking and scores
    runs = []
    for extra in ([], ["--template", "chat"]):
        assert main(chat_pair + ["--method", "bm25", "--json", *extra, q]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    assert [(h["doc_id"], h["score"]) for h in runs[0]] == [
        (h["doc_id"], h["score"]) for h in runs[1]]


def test_real_lm_lines_read_the_benchmark_and_say_when_missing(tmp_path):
    from msif_lite.attribution.measured import real_lm_lines

    assert "no " in real_lm_lines("multi_stage", tmp_path)[0]
    rem = {"multi_stage": {"dm_mean": 3.25, "dm_sem": 0.5, "dm_relative_to_true_sources": 0.5},
           "true_sources": {"dm_mean": 6.5, "dm_sem": 0.25, "dm_relative_to_true_sources": 1.0},
           "bm25": {"dm_mean": 6.5, "dm_sem": 0.25, "dm_relative_to_true_sources": 1.0}}
    (tmp_path / "real_lm.json").write_text(json.dumps(
        {"settings": {"preset": "lab", "k": 4, "n_documents": 96, "n_questions": 12},
         "removal": rem, "methods": {"multi_stage": {"mrr": 0.75, "recall_at_10": 0.5}}}))
    lines = real_lm_lines("multi_stage", tmp_path, preset="cpu")
    assert "not the traced preset 'cpu'" in lines[0] and "top-4" in lines[1]
    ms = next(x for x in lines if x.lstrip().startswith("multi_stage"))
    assert "+3.25 ± 0.50" in ms and "0.750" in ms and ms.endswith("<- this ranking")
    assert any(x.lstrip().startswith("bm25") and "+6.50" in x for x in lines)

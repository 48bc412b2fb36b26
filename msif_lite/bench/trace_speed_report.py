"""The markdown of `msif-lite bench trace-speed` (`bench.trace_speed`): the summary per
variant, seconds per stage (variants side by side) and the memory plan against the peaks."""

from __future__ import annotations

from msif_lite.bench.common import markdown_table

THETA = {"pretrained": "θ_pt", "finetuned": "θ_ft"}


def _plan_rows(r: dict) -> list[dict]:
    """Plan vs measured peaks (above the resident level at each stage's entry)."""
    s, rows = r["session"], []
    for stage, fit in s["fits"].items():
        plan = s["plan"][stage]["fit_gib"]
        rows.append({"variant": r["variant"], "stage": f"fit {THETA[stage]}", "plan GiB": plan,
                     "measured GiB": fit["peak_above_entry_gib"],
                     "error": plan / fit["peak_above_entry_gib"] - 1})  # fmt: skip
    key = "cached scoring_gib" if s["plan"]["pretrained"]["disk_gb"] > 0 else "scoring_gib"
    plan = s["plan"]["pretrained"][key]
    got = s["q1"]["scoring_peak_above_entry_gib"]
    rows.append({"variant": r["variant"], "stage": f"question 1's scores ({key[:-4]})",
                 "plan GiB": plan, "measured GiB": got, "error": plan / got - 1})  # fmt: skip
    return rows


def markdown(rows: list[dict], info: dict) -> str:
    stage_names = sorted({k for r in rows for q in ("q1", "q2")
                          for k in r["session"][q]["stages_s"]})  # fmt: skip
    table = []
    for r in rows:
        s = r["session"]
        line = {"variant": r["variant"], "flags": r["flags"] or "(defaults)",
                "first question s": r["first_question_s"],
                "later, same session s": r["later_question_session_s"],
                "later, new command s": r["later_question_command_s"],
                "peak GiB": max(s["q1"]["peak_gib"], s["q2"]["peak_gib"],
                                r["command_peak_gib"]),
                "RSS after q1 / q2 GiB": f"{s['q1']['rss_after_gib']:.2f} / "
                                         f"{s['q2']['rss_after_gib']:.2f}",
                f"Spearman vs {info['reference']}": r["spearman_vs_reference"]}  # fmt: skip
        table.append(line)
    stages: dict[str, dict] = {}  # stage → {variant: seconds}

    def put(stage: str, variant: str, v: float) -> None:
        stages.setdefault(stage, {"stage": stage})[variant] = v

    for r in rows:
        s, v = r["session"], r["variant"]
        put("imports (+ exit)", v, r["imports_and_exit_s"])
        put("load the pair", v, s["load_s"])
        for st, f in s["fits"].items():
            for k in ("covariance_s", "eigendecomposition_s", "lambda_s"):
                put(f"fit {THETA[st]}: {k[:-2]}", v, f[k])
        for q in ("q1", "q2"):
            for k in stage_names:
                put(f"{q}: {k}", v, s[q]["stages_s"].get(k, 0.0))
            put(f"{q}: all (wall)", v, s[q]["wall_s"])
    cols = ["stage", *(r["variant"] for r in rows)]
    t = info["targets"]
    return (
        f"# Trace speed: {info['preset']}\n\n"
        f"`{info['command']}`: {info['threads']} torch threads, {info['candidates']} candidates, "
        f"layers {info['layers']}, method {info['method']}; wall {info['wall_s'] / 60:.1f} min "
        f"for everything. Each variant in fresh processes with an empty cache (the trained "
        f"pair comes from the pipeline's cache). Questions: {'; '.join(info['questions'])}.\n\n"
        f"Targets (issue 24): first question ≤ {t['first_question_s']:.0f} s, a later one ≤ "
        f"{t['later_question_s']:.0f} s, peak ≤ {t['peak_gib']:g} GiB, plan within "
        f"±{t['plan_error']:.0%}.\n\n"
        "- *first question*: imports, loading the pair, both fits and question 1, as one "
        "`msif-lite trace` with empty caches;\n"
        "- *later, same session*: question 2 on the same Attributor (a notebook);\n"
        "- *later, new command*: `msif-lite trace` on question 2 in a new process with the "
        "caches the first left (wall time, imports included);\n"
        f"- *Spearman vs {info['reference']}*: question 1's scores over its candidates "
        f"against variant {info['reference']}'s (the sampled labels of a fit follow the batch "
        "order, so 'given' and 'length' order differ by the label draws as well).\n\n"
        + markdown_table(table, list(table[0]), ".3g")
        + "\n## Seconds per stage\n\nExclusive times (a stage's own time, not the stages it "
        "calls); the fits' three passes from `FitTimings`.\n\n"
        + markdown_table(list(stages.values()), cols, ".1f")
        + "\n## Memory plan against the measured peaks\n\nResident peak above the level at "
        "the stage's entry (`VmHWM`, reset at entry) against `scale.memory.predict` with the "
        "run's document lengths; question 1's plan is the scoring peak without the stored "
        "factors, which are resident before it starts.\n\n"
        + markdown_table([p for r in rows for p in _plan_rows(r)],
                         ["variant", "stage", "plan GiB", "measured GiB", "error"], ".3g"))

"""`msif-lite bench trace-speed`: what the first and a later question of `msif-lite trace
--real PRESET` cost, stage by stage, against the targets of issue 24, for several settings
measured in one run (results/trace_speed.{json,md}).

Each setting ("variant": extra `msif-lite trace` flags, e.g. `--eigh-dtype float64
--eigh-workers 1`) runs in fresh processes with its own empty cache folder, so every fit and
every candidate gradient is computed as a new user's first question computes them (the
trained pair itself comes from the real pipeline's cache, `world.real_pipeline`):

1. a **session** process (`--row`): the Attributor `msif-lite trace` builds
   (`cli.pair_attributor`), then question 1 and question 2 through `trace_attributor`, the
   command's own path. The fits are forced first (`StageState.factors`, what the first
   `scores` call would do) so they are timed and their peak compared with the memory plan
   (`scale.memory.predict` with the run's document lengths); the other stages are timed
   *exclusively* by wrapping the functions the trace calls (answer, candidate retrieval,
   query preconditioning, candidate gradients, scoring, evidence). Resident memory after each
   question says whether it came back down.
2. a **command** process: `msif-lite trace QUESTION_2 --real PRESET …` as a user runs it a
   second time, with the caches the session left (factors, candidate gradients when stored,
   the embedding index): the later question's time from a fresh process, imports included.

Variant 'after' (or `--reference`) is the reference: each variant reports the Spearman
correlation of its question-1 scores with the reference's over the same candidates (what its
settings change).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from msif_lite.bench.common import Benchmark, BenchResult, display_path, finish
from msif_lite.bench.trace_speed_report import markdown
from msif_lite.engine.prompts import DEFAULT_TEMPLATE
from msif_lite.engine.storage import atomic_write_json
from msif_lite.scale.measure import reset_rss_peak, rss_bytes, settle_rss

GiB = 2**30
TARGETS = {"first_question_s": 300.0, "later_question_s": 30.0, "peak_gib": 6.0,
           "plan_error": 0.20}  # fmt: skip
DEFAULT_VARIANTS = (  # before issue 24's speed work: float64 eigh one layer at a time, dense
    # candidate gradients (streamed above the disk budget), fit data and candidates as given
    "before:--eigh-dtype float64 --eigh-workers 1 --gradient-storage dense --batch-order given",
    "after:--batch-order length",  # the defaults (token storage, eigh workers) + length order
    # + opt-in float32 eigh and the Λ pass from a bf16 cache (no second forward pass)
    "fast:--batch-order length --eigh-dtype float32 --cache-dtype bfloat16 "
    "--cache-activations-mb 3072",
)


# ---------------------------------------------------------------------- measuring, in a row

class Peak:
    """The resident high-water mark (VmHWM) across resets: `reset()` folds the mark so far
    into `highest` and restarts it at the current resident bytes (Linux), so a stage inside a
    question can measure its own peak without losing the question's."""

    def __init__(self) -> None:
        self.highest = rss_bytes("VmHWM")

    def reset(self) -> int:
        """Restart the mark; returns the resident bytes at the restart."""
        self.now()
        return reset_rss_peak()

    def now(self) -> int:  # the high-water mark since the last reset
        mark = rss_bytes("VmHWM")
        self.highest = max(self.highest, mark)
        return mark


class StageClock:
    """Exclusive wall time per named stage: a wrapped function's time minus the wrapped
    functions it calls, so nested stages (fits inside scoring) are not counted twice."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, time spent in children]

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, inner = self._stack.pop()
                spent = time.perf_counter() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + spent - inner
                if self._stack:
                    self._stack[-1][1] += spent
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out  # and start again


def _instrument(clock: StageClock) -> None:
    """Time the stages of `trace_attributor` where they are defined (module attributes and
    methods, so the trace's own code runs unchanged)."""
    from msif_lite.attribution import trace as trace_mod
    from msif_lite.attribution.stage import StageState
    from msif_lite.engine.gradstore import GradientStore

    for name, stage in (("model_answer", "answer"), ("candidates_for", "candidate retrieval"),
                        ("evidence", "evidence")):  # fmt: skip
        setattr(trace_mod, name, clock.wrap(stage, getattr(trace_mod, name)))
    StageState.preconditioned = clock.wrap("query preconditioning", StageState.preconditioned)
    for f in ("_compute", "_compute_docs"):  # dense batches; any form, stored
        setattr(GradientStore, f, clock.wrap("candidate gradients", getattr(GradientStore, f)))
    GradientStore.scores = clock.wrap("scoring (dot products, loads)", GradientStore.scores)


def _plan_peaks(att, n_candidates: int, query_len: int) -> dict[str, dict[str, float]]:
    """The memory plan's fitting peak per stage and its scoring peak above the stored factors,
    for the run's own document lengths (notebook 09 §Memory before each stage)."""
    from msif_lite.scale.memory import predict
    from msif_lite.scale.options import MemoryOptions

    cfg = att.config
    lengths = {"pretrained": [len(att.candidate(d).input_ids) for d in att.doc_ids],
               "finetuned": [len(c.input_ids) for c in att.finetune_examples()]}
    out = {}
    for stage, n in lengths.items():
        plan = predict(att.pretrained, MemoryOptions.from_configs(
            cfg.factors, cfg, lengths=tuple(n), n_queries=1, query_len=query_len,
            n_candidates=min(n_candidates, len(n))), progress=False)  # fmt: skip
        fit = max(plan.peak[s] for s in ("covariance", "eigendecomposition", "lambda"))
        scoring = {}
        for s in ("scoring", "cached scoring"):
            scoring[s] = plan.peak[s] - plan.terms[s].get("factors on device", 0)
        out[stage] = {"fit_gib": fit / GiB, **{f"{k}_gib": v / GiB for k, v in scoring.items()},
                      "disk_gb": plan.disk / 1e9}
    return out


def _question(att, clock: StageClock, peak: Peak, question: str, a, truth
              ) -> tuple[dict, list[float]]:  # fmt: skip
    """One question through `trace_attributor`, timed and measured; its scores over the
    candidates and the peak of that scoring call (the main method's `Attributor.scores`,
    which the memory plan's scoring stage describes)."""
    from msif_lite.attribution.trace import trace_attributor

    seen: list = []
    scores = att.scores

    def record(method, questions, doc_ids, **kw):
        entry = peak.reset()
        out = scores(method, questions, doc_ids, **kw)
        if not seen:
            seen.append((out[0].tolist(), (peak.now() - entry) / GiB))
        return out

    att.scores = record
    peak.reset()
    peak.highest = 0
    t0 = time.perf_counter()
    result = trace_attributor(att, question, k=a.k, n_candidates=a.candidates, method=a.method,
                              truth=truth)  # fmt: skip
    wall = time.perf_counter() - t0
    peak.now()
    del att.scores
    row = {"question": question, "answer": result.question.answer, "wall_s": wall,
           "stages_s": clock.take(), "peak_gib": peak.highest / GiB,
           "scoring_peak_above_entry_gib": seen[0][1], "rss_after_gib": settle_rss() / GiB,
           "top": [(h.doc_id, h.is_true_source) for h in result.hits[:3]]}  # fmt: skip
    return row, seen[0][0]


def _fit(att, stage: str, peak: Peak) -> dict:
    entry = peak.reset()
    t0 = time.perf_counter()
    factors = att.stage(stage).factors
    wall = time.perf_counter() - t0
    t = factors.timings
    return {"wall_s": wall, "covariance_s": t.covariance_s,
            "eigendecomposition_s": t.eigendecomposition_s, "lambda_s": t.lambda_s,
            "peak_above_entry_gib": (peak.now() - entry) / GiB}  # fmt: skip


def session_row(spec: dict) -> dict:
    """The session process: pair, both fits, question 1, question 2 (see the module doc)."""
    from msif_lite.attribution.settings import Stage
    from msif_lite.cli import _real_truth, pair_attributor
    from msif_lite.config import trim_allocator

    trim_allocator()  # as `msif-lite trace` does first
    clock = StageClock()
    _instrument(clock)
    start = settle_rss()
    t0 = time.perf_counter()
    att, _, a = pair_attributor([spec["questions"][0], *spec["argv"]])
    load_s = time.perf_counter() - t0
    models_gib = settle_rss() / GiB
    truth = _real_truth(a)
    peak = Peak()
    fits = {s.value: _fit(att, s.value, peak) for s in (Stage.PRETRAINED, Stage.FINETUNED)}
    factors_gib = settle_rss() / GiB
    q1, scores = _question(att, clock, peak, spec["questions"][0], a, truth)
    q2, _ = _question(att, clock, peak, spec["questions"][1], a, truth)
    q_len = len(att.qa_example(q1["question"], q1["answer"]).input_ids)
    return {"load_s": load_s, "rss_start_gib": start / GiB, "rss_models_gib": models_gib,
            "rss_factors_gib": factors_gib, "fits": fits, "q1": q1, "q2": q2,
            "q1_scores": scores, "plan": _plan_peaks(att, a.candidates, q_len)}  # fmt: skip


def command_row(spec: dict) -> dict:
    """`msif-lite trace` itself on question 2 (its output kept out of the JSON line)."""
    from msif_lite.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        rc = main(["trace", spec["questions"][1], *spec["argv"], "--quiet"])
    return {"rc": rc, "peak_gib": rss_bytes("VmHWM") / GiB}


# ---------------------------------------------------------------------- the run
def _run(mode: str, spec: dict, threads: int) -> tuple[dict, float]:
    """One row in a fresh process (`threads` torch threads, the allocator as the CLI sets
    it); (its JSON, its wall seconds from process start, imports included)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")  # fmt: skip
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", __name__, "--row",
                          json.dumps({**spec, "mode": mode})],
                         stdout=subprocess.PIPE, stderr=None if spec.get("show") else
                         subprocess.PIPE, text=True, env=env, check=False)  # fmt: skip
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{mode} row of {spec['variant']} failed:\n{(out.stderr or '')[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'NAME:FLAGS' → (NAME, the flags as a list), e.g. 'f32:--eigh-dtype float32'."""
    name, sep, flags = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: write NAME:FLAGS, e.g. 'f32:--eigh-dtype float32' "
                         "(FLAGS may be empty: the defaults)")
    return name, shlex.split(flags)


def run_variant(name: str, flags: list[str], a: argparse.Namespace, cache: Path) -> dict:
    pair = ["--real", a.preset] if a.pair is None else shlex.split(a.pair)
    argv = [*pair, "--candidates", str(a.candidates), "--method", a.method,
            "-k", str(a.k), "--cache-dir", str(cache), *a.trace_args, *flags]  # fmt: skip
    if a.layers:
        argv += ["--layers", a.layers]
    else:
        argv += ["--mlp-only"]
    spec = {"variant": name, "argv": argv, "questions": a.questions, "show": a.show}
    session, session_wall = _run("session", spec, a.threads)
    command, command_wall = _run("command", spec, a.threads)
    if command["rc"] != 0:
        raise RuntimeError(f"`msif-lite trace` failed in variant {name}")
    fits = session["fits"]
    fit_s = sum(f["wall_s"] for f in fits.values())
    imports_s = session_wall - session["load_s"] - fit_s - session["q1"]["wall_s"] - session[
        "q2"]["wall_s"]  # fmt: skip
    first = imports_s + session["load_s"] + fit_s + session["q1"]["wall_s"]
    return {"variant": name, "flags": " ".join(flags), "session": session,
            "first_question_s": first, "later_question_session_s": session["q2"]["wall_s"],
            "later_question_command_s": command_wall, "command_peak_gib": command["peak_gib"],
            "imports_and_exit_s": imports_s}  # fmt: skip


def _questions(preset: str, n: int = 2) -> list[str]:
    """The first `n` held-out questions of the preset's world."""
    from msif_lite.world.real_pipeline import REAL_PRESETS
    from msif_lite.world.real_text import load_real_world
    world = REAL_PRESETS[preset].world(load_real_world(Path("data/real_lm")))
    return [DEFAULT_TEMPLATE.strip(q.prompt) for q in world.heldout[:n]]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msif-lite bench trace-speed", description=__doc__)
    p.add_argument("--preset", default="cpu", help="real pipeline preset (default cpu)")
    p.add_argument("--pair", metavar="FLAGS",
                   help="your own pair's `msif-lite trace` flags instead of --real PRESET "
                        "(--pretrained … --finetuned … --corpus … --finetune-data … --alpha …; "
                        "give two --question)")
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--method", default="multi_stage")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--layers", help="a --layers regex instead of --mlp-only")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--variant", action="append", metavar="NAME:FLAGS",
                   help="a setting: extra `msif-lite trace` flags (repeatable; default: "
                        f"{' and '.join(repr(v) for v in DEFAULT_VARIANTS)})")
    p.add_argument("--trace-args", default="", help="flags given to every variant")
    p.add_argument("--reference", help="the variant whose question-1 scores the others are "
                                       "compared with (default 'after', else the first)")
    p.add_argument("--question", action="append", dest="questions",
                   help="two questions (default: the world's first two held-out questions)")
    p.add_argument("--out", default="results")
    p.add_argument("--name", default="trace_speed", help="results/<name>.{json,md}")
    p.add_argument("--show", action="store_true", help="show the rows' progress bars")
    p.add_argument("--resume", action="store_true",
                   help="keep the variants <out>/<name>.partial.json already measured with "
                        "the same settings and flags (each variant is written there when done)")
    p.add_argument("--row", help=argparse.SUPPRESS)
    return p


def run_variants(variants: list[tuple[str, list[str]]], a: argparse.Namespace) -> list[dict]:
    """Each variant's row, written to <out>/<name>.partial.json as soon as it is measured;
    with --resume, rows of that file measured with the same settings and flags are kept."""
    partial = Path(a.out) / f"{a.name}.partial.json"
    key = {k: getattr(a, k) for k in ("preset", "pair", "candidates", "method", "k", "layers",
                                      "threads", "trace_args", "questions")}  # fmt: skip
    done = {}
    if a.resume and partial.exists():
        old = json.loads(partial.read_text())
        if old["key"] == key:
            done = {(r["variant"], r["flags"]): r for r in old["rows"]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="msif-trace-speed-") as tmp:
        for i, (name, flags) in enumerate(variants):
            row = done.get((name, " ".join(flags)))
            if row is None:
                t0 = time.perf_counter()
                row = run_variant(name, flags, a, Path(tmp) / f"cache{i}")
                row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            atomic_write_json(partial, {"key": key, "rows": rows})
            print(f"{name}: first question {row['first_question_s']:.0f} s, later "
                  f"{row['later_question_command_s']:.0f} s", file=sys.stderr)
    return rows


def main(argv: Sequence[str] | None = None) -> BenchResult:
    a = parser().parse_args(argv)
    variants = [parse_variant(v) for v in (a.variant or DEFAULT_VARIANTS)]
    a.trace_args = shlex.split(a.trace_args)
    if a.pair is not None and not a.questions:
        raise ValueError("--pair needs two --question (the world's questions come with --real)")
    a.questions = a.questions or _questions(a.preset)
    if len(a.questions) != 2:
        raise ValueError("give two --question (the first and a later one), or none")
    rows = run_variants(variants, a)
    import torch

    from msif_lite.engine.correlation import spearman

    names = [r["variant"] for r in rows]
    ref_name = a.reference or ("after" if "after" in names else names[0])
    if ref_name not in names:
        raise ValueError(f"--reference {ref_name!r} is not a variant: one of {names}")
    ref = torch.tensor(rows[names.index(ref_name)]["session"]["q1_scores"])
    for r in rows:
        r["spearman_vs_reference"] = spearman(ref, torch.tensor(r["session"]["q1_scores"]))
    info = {"preset": f"the real pair (`--real {a.preset}`)" if a.pair is None else
            "your own pair (`--pair`)", "candidates": a.candidates, "method": a.method,
            "layers": a.layers or "MLP (--mlp-only)", "threads": a.threads,
            "questions": a.questions, "targets": TARGETS, "reference": ref_name,
            "wall_s": sum(r["wall_s"] for r in rows),
            "command": "msif-lite bench trace-speed " + " ".join(
                shlex.quote(x) for x in (argv or [])),
            "out": display_path(a.out)}  # fmt: skip
    return finish(a.name, {"settings": info, "rows": rows}, markdown(rows, info), a.out)


BENCH = Benchmark("trace-speed", "the first and a later `msif-lite trace --real` question, "
                  "stage by stage, peak and plan, for several settings", main)  # fmt: skip


if __name__ == "__main__":
    ns, _ = parser().parse_known_args()
    if ns.row:
        spec = json.loads(ns.row)
        row = (session_row if spec["mode"] == "session" else command_row)(spec)
        print(json.dumps(row))
    else:
        main()

"""Counterfactual truth on the real model: `msif-lite bench real-lm` (issue 24).

Do the kit's conclusions on its tiny models (results/lds.md, results/variants.md: multi-stage
vs BM25 vs the token variants) hold on a real pretrained LM? On the real-language world
(`data/real_lm`) trained into SmolLM2-135M-Instruct — **a 4-bit (Q4_1) approximation** of the
released weights, dequantised to float32 (`scale.real_lm`) — by the two stages of
`world.real_pipeline` (preset `--preset`, default "lab": 96 documents, ~2.5 min per run of
both stages on one thread; "cpu": the full 218-document world, ~8.5 min per run, slower):

1. questions: the 12 held-out questions, each with its given answer; m(q) = −log p(answer +
   eos | prompt) at θ_ft (`eval.retraining.measure`, as in bench lds). The given answer is
   not always what θ_ft says greedily: the greedy accuracy is reported beside it;
2. scores: every method (multi_stage, the best variant multi_stage_token_positive, BM25,
   embedding, random) scores every document of the world for every question, with EK-FAC on
   the MLP layers only (`--layers N`: of the last N blocks, to bound the fit); fact tracing:
   MRR and recall@10 of each question's true sources (`source_doc_ids`) over all documents;
3. leave-top-k-out: per method, the union over the questions of each question's top-k
   documents (k = sources per fact unless `--k`) is removed and both stages are retrained
   once with the same seed — joint removal, one retrain per method, because removing per
   question would take 12× as many retrains; the documents shared between questions' top-k
   are counted. Δm(q) = m(retrained) − m(original) per question. Rows beside the methods:
   true_sources (every source of every question removed), random (k seeded random documents
   per question, the `random` method), none (the full corpus, the same seed: Δm should be 0,
   a determinism check) and noise (the full corpus, another seed: the seed noise of Δm).

Each score set and each retrain is cached as JSON under `--cache-dir` (resumable: an
interrupted run continues where it stopped); results/real_lm.{json,md} are rewritten after
each retrain (status "partial") and the plot at the end. MSIF_FAST=1: the "smoke" preset on
the first 3 held-out questions of a shrunken world (2 paragraphs, 1 fine-tuning fact per
relation) — plumbing for tests (`--model` takes any local model folder), not a result.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from msif_lite.attribution.attributor import AttributionConfig, Attributor
from msif_lite.bench.common import Benchmark, BenchResult, Timer, finish, write_results
from msif_lite.bench.real_lm_report import markdown, plot, summary
from msif_lite.config import fast_mode
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.storage import atomic_write_json
from msif_lite.eval.retraining import outcome
from msif_lite.scale.pairs import load_model_pair
from msif_lite.scale.real_lm import QUANTISATION_NOTE, smollm2_folder
from msif_lite.world.real_pipeline import CACHE, REAL_PRESETS, build_real_pipeline, run_stages
from msif_lite.world.real_text import RealWorld, load_real_world, save_real_world
from msif_lite.world.shipped import data_dir

METHODS_MAIN = ("multi_stage", "multi_stage_token_positive", "bm25", "embedding", "random")


@dataclass(frozen=True)
class RealLMConfig:
    """What the benchmark trains, scores and retrains (the defaults are the committed run)."""

    preset: str = "lab"  # world.real_pipeline.REAL_PRESETS
    layers: int | None = None  # MLP layers of the last N blocks; None: every block's
    k: int | None = None  # each question's top-k removed; None: sources per fact
    methods: tuple[str, ...] = METHODS_MAIN
    seed: int = 0  # the original run's and every removal retrain's seed
    noise_seed: int = 1  # the noise row: the full corpus under another seed
    questions: int | None = None  # the first n held-out questions only (fast mode)
    gradient_cache_gb: float = 2.0  # above it, candidate gradients are streamed, never written


FAST = RealLMConfig(preset="smoke", questions=3)


def fast_world(world: RealWorld, n_questions: int) -> RealWorld:
    """`world.subset(2, 1)` restricted to its first `n_questions` held-out questions (the
    other held-out facts and their documents dropped)."""
    small = world.subset(2, 1)
    drop = {q.fact_id for q in small.heldout[n_questions:]}
    return replace(small, heldout=small.heldout[:n_questions],
                   facts=[f for f in small.facts if f.fact_id not in drop],
                   documents=[d for d in small.documents if not set(d.fact_ids) & drop])


def tracked(model, layers: int | None) -> str | tuple[str, ...]:
    """FactorConfig.include: 'mlp', or the MLP layers of the last `layers` blocks."""
    if layers is None:
        return "mlp"
    n = model.config.num_hidden_layers
    if not 1 <= layers <= n:
        raise ValueError(f"--layers must be in [1, {n}] (the model has {n} blocks)")
    return tuple(rf"(^|\.)layers\.{i}\.mlp\." for i in range(n - layers, n))


def original_run(cfg: RealLMConfig, base: Path, world_dir: Path, run_cache: Path,
                 pipeline_cache: Path, progress: bool) -> tuple[Path, RealWorld]:  # fmt: skip
    """The cached original run of both stages (`build_real_pipeline`) and its world."""
    if cfg.questions is not None:
        small = fast_world(load_real_world(world_dir), cfg.questions)
        world_dir = save_real_world(small, run_cache / "fast-world")
    root = build_real_pipeline(base, cfg.preset, world_dir, pipeline_cache, cfg.seed, progress)
    return root, REAL_PRESETS[cfg.preset].world(load_real_world(world_dir))


def method_scores(cfg: RealLMConfig, root: Path, world: RealWorld, run_dir: Path,
                  progress: bool) -> tuple[dict[str, dict], dict]:  # fmt: skip
    """Per method {"scores": (Q, N) list, "doc_ids", "s"}, each cached as JSON in
    run_dir/scores; the Attributor (both EK-FAC fits) is built only when one is missing."""
    path = {n: run_dir / "scores" / f"{n}.json" for n in cfg.methods}
    fit_json = run_dir / "scores" / "fit.json"
    todo = [n for n in cfg.methods if not path[n].is_file()]
    if todo:
        ck = root / "checkpoints"
        pair = load_model_pair(ck / "pretrained", ck / "finetuned")
        fc = FactorConfig(include=tracked(pair.pretrained, cfg.layers))
        att = Attributor(pair.pretrained, pair.finetuned, pair.tokenizer,
                         [(d.id, d.text) for d in world.documents],
                         [(q.prompt, q.answer) for q in world.finetune],
                         AttributionConfig(factors=fc, cache_dir=str(run_dir / "msif"),
                                           progress=progress,
                                           gradient_cache_gb=cfg.gradient_cache_gb),
                         alpha=REAL_PRESETS[cfg.preset].alpha)  # fmt: skip
        with Timer() as t:
            _ = att.pretrain_factors, att.finetune_factors
        if not fit_json.is_file():
            atomic_write_json(fit_json, {"fit_s": t.seconds, "n_tracked": len(att.modules),
                                         "tracked_params": sum(m.numel for m in att.modules)})
        for n in tqdm(todo, desc="scoring methods", disable=not progress):
            with Timer() as t:
                s = att.scores(n, world.heldout, att.doc_ids)
            atomic_write_json(path[n], {"method": n, "doc_ids": att.doc_ids, "s": t.seconds,
                                        "scores": s.double().tolist()})  # fmt: skip
        del att, pair
        gc.collect()
    return ({n: json.loads(p.read_text()) for n, p in path.items()},
            json.loads(fit_json.read_text()))


def top_k(scores: Sequence[Sequence[float]], doc_ids: Sequence[str], k: int) -> list[list[str]]:
    """Each question's k highest-scoring documents (ties: the first in corpus order)."""
    s = torch.tensor(scores, dtype=torch.float64)
    return [[doc_ids[j] for j in row.argsort(descending=True, stable=True)[:k].tolist()]
            for row in s]  # fmt: skip


def removal_sets(world: RealWorld, scored: dict[str, dict], k: int, seed: int,
                 noise_seed: int) -> dict[str, dict]:  # fmt: skip
    """Per row: each question's removed documents ("per_question"), their union
    ("removed") and the retrain seed; true_sources first, none and noise last."""
    rows = {"true_sources": [list(q.source_doc_ids) for q in world.heldout]}
    rows |= {n: top_k(v["scores"], v["doc_ids"], k) for n, v in scored.items()}
    out = {n: {"per_question": pq, "removed": sorted({d for x in pq for d in x}), "seed": seed}
           for n, pq in rows.items()}  # fmt: skip
    out["none"] = {"per_question": [], "removed": [], "seed": seed}
    out["noise"] = {"per_question": [], "removed": [], "seed": noise_seed}
    return out


def retrain_row(name: str, spec: dict, base: Path, world: RealWorld, preset: str,
                run_dir: Path, progress: bool) -> dict:  # fmt: skip
    """Both stages retrained without `spec["removed"]` (cached in run_dir/retrains/<name>.json
    while the removed documents and the seed are unchanged): m and greedy correctness of
    every held-out question, and seconds."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = run_dir / "retrains" / f"{name}.json"
    for old in sorted(path.parent.glob("*.json"), key=lambda p: p != path):  # its own first
        row = json.loads(old.read_text())
        if row["removed"] == spec["removed"] and row["seed"] == spec["seed"]:
            if old != path:  # the same documents removed by another row: the same retrain
                row = {**row, "name": name, "reused_from": row["name"]}
                atomic_write_json(path, row)
            return row
    gone = set(spec["removed"])
    kept = replace(world, documents=[d for d in world.documents if d.id not in gone])
    tmp = Path(tempfile.mkdtemp(prefix=f".retrain-{name}-", dir=run_dir))
    try:
        with Timer() as t:
            res = run_stages(base, kept, REAL_PRESETS[preset], tmp, spec["seed"], progress)
            ft = tmp / "checkpoints" / "finetuned"
            model = AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32).eval()
            row = outcome(model, AutoTokenizer.from_pretrained(str(ft)), world.heldout)
        del model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row = {"name": name, "removed": spec["removed"], "seed": spec["seed"], **row,
           "s": t.seconds, "threads": torch.get_num_threads(),
           "pretrained_nll_mean": res["stages"]["pretrained"]["heldout"]["nll_mean"]}
    atomic_write_json(path, row)
    gc.collect()
    return row


def original_outcome(root: Path, world: RealWorld, run_dir: Path) -> dict:
    """m and greedy correctness of the held-out questions at the original θ_ft (cached), and
    the pipeline's own results.json summary (held-out −log p and accuracy per stage)."""
    path = run_dir / "original.json"
    if not path.is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        ft = root / "checkpoints" / "finetuned"
        model = AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32).eval()
        atomic_write_json(path, outcome(model, AutoTokenizer.from_pretrained(str(ft)),
                                        world.heldout))  # fmt: skip
    res = json.loads((root / "results.json").read_text())
    return {**json.loads(path.read_text()), "pipeline": {
        "folder": root.name, "threads": res.get("threads"), "elapsed_s": res.get("elapsed_s"),
        "stages": {k: {"heldout_nll_mean": v["heldout"]["nll_mean"],
                       "heldout_accuracy": v["heldout"]["accuracy"]}
                   for k, v in res["stages"].items()}}}  # fmt: skip


def settings(cfg: RealLMConfig, a: argparse.Namespace, world: RealWorld, k: int,
             fit: dict) -> dict:  # fmt: skip
    """What the run was (goes into the JSON)."""
    return {**asdict(cfg), "k": k, "threads": a.threads, "fast": fast_mode(),
            "model": Path(a.model).name if a.model else "SmolLM2-135M-Instruct (Q4_1)",
            "model_note": "a local model folder (--model), not the real model" if a.model
            else QUANTISATION_NOTE, "pipeline_preset": asdict(REAL_PRESETS[cfg.preset]),
            "n_documents": len(world.documents), "n_questions": len(world.heldout),
            "sources_per_question": [len(q.source_doc_ids) for q in world.heldout],
            "tracked_layers": fit["n_tracked"], "tracked_params": fit["tracked_params"],
            "layers_tracked": "MLP of every block" if cfg.layers is None else
            f"MLP of the last {cfg.layers} blocks",
            "measurement": "m(q) = −log p(answer + eos | prompt) at θ_ft, the given answer",
            "removal": "joint: the union over questions of each question's top-k, one retrain "
                       "of both stages per method (per-question removal: 12× the retrains), "
                       "with the preset's number of steps (the kept documents are seen more "
                       "often), the same seed; k defaults to the sources per fact, so a "
                       "perfect ranking's top-k is exactly the question's true sources",
            "command": " ".join(["msif-lite bench real-lm",
                                 *(sys.argv[1:] if a.argv is None else a.argv)])}  # fmt: skip


def previous_wall(path: Path, info: dict) -> float:
    """The wall time of earlier invocations of the same run (an interrupted or cached one)
    from the results file they wrote, so a resumed run reports its whole wall time; 0.0 when
    the file is of another run."""
    if not path.is_file():
        return 0.0
    old = json.loads(path.read_text())
    keys = ("preset", "layers", "k", "methods", "seed", "noise_seed", "model")
    now = json.loads(json.dumps({x: info["settings"][x] for x in keys}))  # tuples → lists
    same = all(old.get("settings", {}).get(x) == now[x] for x in keys) and \
        old.get("original", {}).get("pipeline") == info["original"]["pipeline"]
    t = old.get("timings_s", {})
    return float(t.get("wall_all_invocations", t.get("wall_this_invocation", 0.0))) if same \
        else 0.0


def run(cfg: RealLMConfig, a: argparse.Namespace) -> dict:
    """Everything: the original run, scores, retrains (writing partial results after each)."""
    t0, progress = time.perf_counter(), not a.no_progress
    base = Path(a.model) if a.model else smollm2_folder(a.pipeline_cache)
    run_cache = Path(a.cache_dir)
    with Timer() as t_pipe:
        root, world = original_run(cfg, base, Path(a.world_dir), run_cache,
                                   Path(a.pipeline_cache), progress)  # fmt: skip
    run_dir = run_cache / f"{cfg.preset}-{root.name}-{cfg.layers or 'all'}"
    scored, fit = method_scores(cfg, root, world, run_dir, progress)
    k = cfg.k or max(len(q.source_doc_ids) for q in world.heldout)
    specs = removal_sets(world, scored, k, cfg.seed, cfg.noise_seed)
    base_row = original_outcome(root, world, run_dir)
    order = ["none", "true_sources", *cfg.methods, "noise"]
    info = {"settings": settings(cfg, a, world, k, fit), "fit": fit, "original": base_row,
            "pipeline_s": t_pipe.seconds}  # fmt: skip
    info["wall_before_s"] = previous_wall(Path(a.out) / "real_lm.json", info)
    rows: dict[str, dict] = {}
    for name in tqdm(order, desc="retrains (both stages)", disable=not progress):
        rows[name] = retrain_row(name, specs[name], base, world, cfg.preset, run_dir, progress)
        payload = summary(info, world, scored, specs, rows, time.perf_counter() - t0)
        write_results("real_lm", payload, markdown(payload), a.out)
    payload["status"] = "complete"
    return payload


def main(argv: Sequence[str] | None = None) -> BenchResult:
    ap = argparse.ArgumentParser(prog="msif-lite bench real-lm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=list(REAL_PRESETS),
                    help="training preset of both stages: lab (default; 96 documents, ~2.5 "
                         "min per retrain) or cpu (the full 218-document world, ~8.5 min per "
                         "retrain); MSIF_FAST=1: smoke")  # fmt: skip
    ap.add_argument("--layers", type=int, default=None,
                    help="track the MLP layers of the last N blocks only (default: every block)")
    ap.add_argument("--k", type=int, default=None,
                    help="top-k removed per question (default: the sources per fact)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--model", default=None,
                    help="base model folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--world-dir", default=str(data_dir() / "real_lm"))
    ap.add_argument("--pipeline-cache", default=str(CACHE), help="the original run's cache")
    ap.add_argument("--cache-dir", default=str(CACHE / "bench"), help="scores and retrains")
    ap.add_argument("--out", default="results", help="where real_lm.* go")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    a.argv = None if argv is None else list(argv)
    torch.set_num_threads(a.threads)
    cfg = FAST if fast_mode() else RealLMConfig()
    cfg = replace(cfg, **{k: v for k, v in (("preset", a.preset), ("layers", a.layers),
                                            ("k", a.k)) if v is not None})  # fmt: skip
    payload = run(cfg, a)
    result = finish("real_lm", payload, markdown(payload), a.out)
    plot(payload, result.json_path.with_suffix(".png"))
    return result


BENCH = Benchmark("real-lm", "counterfactual truth on the real model (SmolLM2-135M, 4-bit "
                  "approximation): leave-top-k-out retraining of both stages per method "
                  "beside fact-tracing MRR / recall@10", main)
